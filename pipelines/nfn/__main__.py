"""``python -m pipelines.nfn [ACTION] --config F [--set k=v]``: the same as ``equiray nfn ...``."""
import sys

from pipelines.cli import main

raise SystemExit(main(["nfn", *sys.argv[1:]]))

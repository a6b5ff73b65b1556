"""``python -m equiray_pipelines.nfn [ACTION] --config F [--set k=v]``: the same as ``equiray nfn ...``."""
import sys

from equiray_pipelines.cli import main

raise SystemExit(main(["nfn", *sys.argv[1:]]))

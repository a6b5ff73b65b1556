"""``python -m pipelines.robust [ACTION] --config F [--set k=v]``: the same as ``equiray robust ...``."""
import sys

from pipelines.cli import main

raise SystemExit(main(["robust", *sys.argv[1:]]))

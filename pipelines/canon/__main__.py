"""``python -m pipelines.canon [ACTION] --config F [--set k=v]``: the same as ``equiray canon ...``."""
import sys

from pipelines.cli import main

raise SystemExit(main(["canon", *sys.argv[1:]]))

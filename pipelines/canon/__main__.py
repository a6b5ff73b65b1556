"""``python -m equiray_pipelines.canon [ACTION] --config F [--set k=v]``: the same as ``equiray canon ...``."""
import sys

from equiray_pipelines.cli import main

raise SystemExit(main(["canon", *sys.argv[1:]]))

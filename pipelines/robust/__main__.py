"""``python -m equiray_pipelines.robust [ACTION] --config F [--set k=v]``: the same as ``equiray robust ...``."""
import sys

from equiray_pipelines.cli import main

raise SystemExit(main(["robust", *sys.argv[1:]]))

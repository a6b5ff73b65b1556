"""``python -m equiray_pipelines.distill [ACTION] --config F [--set k=v]``: the same as ``equiray distill ...``."""
import sys

from equiray_pipelines.cli import main

raise SystemExit(main(["distill", *sys.argv[1:]]))

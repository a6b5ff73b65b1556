"""``python -m pipelines.distill [ACTION] --config F [--set k=v]``: the same as ``equiray distill ...``."""
import sys

from pipelines.cli import main

raise SystemExit(main(["distill", *sys.argv[1:]]))

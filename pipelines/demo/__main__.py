"""``python -m pipelines.demo [--config F] [--set k=v]``: the same as ``equiray demo ...``."""
import sys

from pipelines.cli import main

raise SystemExit(main(["demo", *sys.argv[1:]]))

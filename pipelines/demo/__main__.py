"""``python -m equiray_pipelines.demo [--config F] [--set k=v]``: the same as ``equiray demo ...``."""
import sys

from equiray_pipelines.cli import main

raise SystemExit(main(["demo", *sys.argv[1:]]))

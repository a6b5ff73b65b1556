"""``python -m equiray_pipelines.serve ACTION --config F [--set k=v]``: the same as ``equiray serve ...``."""
import sys

from equiray_pipelines.cli import main

raise SystemExit(main(["serve", *sys.argv[1:]]))

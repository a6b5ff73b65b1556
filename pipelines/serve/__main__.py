"""``python -m pipelines.serve ACTION --config F [--set k=v]``: the same as ``equiray serve ...``."""
import sys

from pipelines.cli import main

raise SystemExit(main(["serve", *sys.argv[1:]]))

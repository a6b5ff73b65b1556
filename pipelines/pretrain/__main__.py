"""``python -m pipelines.pretrain [ACTION] --config F [--set k=v]``: the same as ``equiray pretrain ...``."""
import sys

from pipelines.cli import main

raise SystemExit(main(["pretrain", *sys.argv[1:]]))

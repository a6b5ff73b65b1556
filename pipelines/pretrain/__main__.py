"""``python -m equiray_pipelines.pretrain [ACTION] --config F [--set k=v]``: the same as ``equiray pretrain ...``."""
import sys

from equiray_pipelines.cli import main

raise SystemExit(main(["pretrain", *sys.argv[1:]]))

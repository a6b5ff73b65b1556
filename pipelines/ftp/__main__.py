"""``python -m pipelines.ftp tune [--config F] [--set k=v] [--resume]``: the same as ``equiray ftp tune ...``."""
import sys

from pipelines.cli import main

raise SystemExit(main(["ftp", *sys.argv[1:]]))

"""``python -m pipelines.ftp [--config F] [--set k=v] [--resume]``: the same as ``equiray ftp tune ...``."""
import sys

from pipelines.cli import main

raise SystemExit(main(["ftp", "tune", *sys.argv[1:]]))

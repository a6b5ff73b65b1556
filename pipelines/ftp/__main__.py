"""``python -m equiray_pipelines.ftp tune [--config F] [--set k=v] [--resume]``: the same as ``equiray ftp tune``."""
import sys

from equiray_pipelines.cli import main

raise SystemExit(main(["ftp", *sys.argv[1:]]))

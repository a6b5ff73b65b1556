"""``python -m equiray_pipelines.ensemble [ACTION] --config F [--set k=v]``: the same as ``equiray ensemble ...``."""
import sys

from equiray_pipelines.cli import main

raise SystemExit(main(["ensemble", *sys.argv[1:]]))

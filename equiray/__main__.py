"""``python -m equiray``: the ``equiray`` command (the CLI lives with the pipelines it starts)."""
from equiray_pipelines._entry import main

if __name__ == "__main__":
    raise SystemExit(main())

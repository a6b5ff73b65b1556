"""The ``equiray`` console script. It imports the command line inside a Ctrl+C guard: the import (torch, Ray,
MLflow) takes seconds, and an interrupt during it should end like one during a command (``interrupted``, exit
status 130), not with a traceback of the import machinery, nor be lost (an import that catches every exception
swallows the KeyboardInterrupt, and the command would then run: the guard's own handler remembers the signal).
This module imports nothing heavy at the top."""
from __future__ import annotations

import signal
import sys

INTERRUPTED = 130


def main() -> int:
    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        from equiray_pipelines.cli import main as cli_main
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if signal.getsignal(signal.SIGINT) is on_sigint:  # an import may have set a handler of its own: keep it
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    return cli_main()

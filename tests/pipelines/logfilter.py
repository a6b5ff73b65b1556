"""Which lines of a pipeline's console output are the libraries' (Ray, Train, Tune, Data, Serve, MLflow) rather
than equiray's own: the filter behind the quiet-logs test (issue 20: under 5% of a run's lines)."""
from __future__ import annotations

import re

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_PREFIX = re.compile(r"^\(([\w:.\-]+) pid=\d+(?:, ip=[\d.]+)?\)\s?(.*)$")
EQUIRAY_TAG = re.compile(r"^\[[\w][\w\- ]*\] ")  # what equiray's say() lines start with inside Ray: "[pretrain] "
LIBRARY = re.compile("|".join([
    r"site-packages/",  # a library's warning or traceback frame
    r"[╭╰├│┌└]",  # Tune's tables
    r"^\d{4}[-/]\d\d[-/]\d\d \d\d:\d\d:\d\d",  # Ray's and MLflow's log format
    r"^(INFO|WARNING|DEBUG|ERROR) \d{4}-\d\d-\d\d",  # Serve's
    r"View detailed results here|To visualize your results with TensorBoard|Trial status:|Current time: ",
    r"Registered model '.*' already exists|Created version '\d+' of model|Successfully registered model '",
    r"Dataset \S+ execution finished|Progress bars disabled|Checkpoint successfully created|Reporting training result",
    r"Requesting resources: |training worker group|Setting up process group|Moving model to device",
]))
WARNING = re.compile(r"\b\w*Warning: ")


def library_lines(text: str) -> tuple[list[str], int]:
    """``(the libraries' lines, all non-empty lines)`` of a console capture."""
    found, total, after_warning = [], 0, False
    for raw in text.splitlines():
        line = ANSI.sub("", raw).rstrip()
        if not line.strip():
            continue
        total += 1
        if line.startswith("(raylet)"):  # Ray's node daemon: never equiray's
            found.append(line)
            after_warning = False
            continue
        m = RAY_PREFIX.match(line)
        body = m.group(2) if m else line
        if m:
            internal = not EQUIRAY_TAG.match(body)
        else:
            internal = bool(LIBRARY.search(body)) or (after_warning and body.startswith("  "))
        after_warning = bool(WARNING.search(body))
        if internal:
            found.append(line)
    return found, total

"""Shared by the benchmark scripts: how the machine is named and where the Markdown table goes."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, no GPU"


def emit(table: str, out: str | None) -> None:
    """Print the table and, with ``out``, also write it to that file."""
    print(table)
    if out:
        Path(out).write_text(table + "\n")

"""Free local ports for the Ray instances the tests start of their own (a head for job submission, a simulated
multi-node cluster)."""
from __future__ import annotations

import random
import socket

_ISSUED: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768-60999) and above Ray's worker ports (10002-19999), never
    the same one twice in a process. A port the OS hands out for bind(0) can be taken again, between this pick and
    the node's bind, by any process on the machine that binds port 0 or connects, the node's own Ray processes
    among them; then the dashboard URL answers with another server's bytes (the CI failure of stop 30)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32000)
        if port in _ISSUED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ISSUED.add(port)
        return port
    raise RuntimeError("no free port in 20000-32000")

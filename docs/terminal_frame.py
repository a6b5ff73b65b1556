"""One frame of a terminal recording as an HTML page: the screen at the moment the most progress bars were on it.

``script --log-timing TIMING TYPESCRIPT`` records what a command wrote to a terminal, chunk by chunk; pyte (a
terminal emulator in Python) replays the chunks, and the screen with the most bars (``%|``) on it, then the most
still running, the latest of equals, is written as HTML in the terminal's colours for a headless browser to photograph
(docs/progress_screenshot.sh).

    python docs/terminal_frame.py TYPESCRIPT TIMING --cols 110 --rows 30 --out frame.html
"""
from __future__ import annotations

import argparse
import html
from pathlib import Path

import pyte

COLOURS = {"default": "#d4d4d4", "black": "#1e1e1e", "red": "#f14c4c", "green": "#23d18b", "brown": "#e5e510",
           "yellow": "#e5e510", "blue": "#3b8eea", "magenta": "#d670d6", "cyan": "#29b8db", "white": "#e5e5e5"}


def frames(typescript: Path, timing: Path, cols: int, rows: int):
    """The screen after every recorded chunk, as ``((bars on it, bars still running), lines of (char, colour,
    bold))``."""
    screen = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(screen)
    data = typescript.read_bytes()
    pos = data.index(b"\n") + 1  # script's own header line
    for line in timing.read_text().splitlines():
        _, size = line.split()
        stream.feed(data[pos:pos + int(size)])
        pos += int(size)
        text = [screen.buffer[y] for y in range(rows)]
        lines = [[(row[x].data, row[x].fg, row[x].bold) for x in range(cols)] for row in text]
        texts = ["".join(c for c, _, _ in ln) for ln in lines]
        yield (sum("%|" in t for t in texts), sum("%|" in t and "100%|" not in t for t in texts)), lines


def to_html(lines) -> str:
    out = []
    for ln in lines:
        spans = "".join(f'<span style="color:{COLOURS.get(fg, "#" + fg if len(fg) == 6 else COLOURS["default"])}'
                        f'{";font-weight:bold" if bold else ""}">{html.escape(ch)}</span>' for ch, fg, bold in ln)
        out.append(spans)
    body = "\n".join(out)
    return ("<!doctype html><meta charset=utf-8><body style='margin:0;background:#1e1e1e'>"
            "<pre style='margin:12px;font:14px/1.3 \"DejaVu Sans Mono\",monospace;color:#d4d4d4'>"
            f"{body}</pre></body>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("typescript", type=Path)
    ap.add_argument("timing", type=Path)
    ap.add_argument("--cols", type=int, default=110)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--showing", default="", help="only frames with this text on screen (e.g. a bar's name)")
    args = ap.parse_args()
    shown = ((i, f) for i, f in enumerate(frames(args.typescript, args.timing, args.cols, args.rows))
             if args.showing in "".join(c for ln in f[1] for c, _, _ in ln))
    _, (bars, lines) = max(shown, key=lambda f: (f[1][0], f[0]), default=(0, ((0, 0), [])))
    if not bars[0]:
        raise SystemExit("error: no progress bar on any frame of the recording")
    args.out.write_text(to_html(lines))
    print(f"wrote {args.out} ({bars[0]} bars on screen, {bars[1]} running)")


if __name__ == "__main__":
    main()

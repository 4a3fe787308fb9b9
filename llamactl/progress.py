"""Progress on stderr: a tqdm bar on a terminal; elsewhere (a log file, a pipe) a plain line now and then.

A bar's redraws in a log are kilobytes of carriage returns; a long run logged to a file gets one line every
``LOG_EVERY_S`` seconds instead, and a short one gets none.
"""

from __future__ import annotations

import sys
import time

LOG_EVERY_S = 30.0


def progress(desc: str, unit: str, total: int | None = None, initial: int = 0, unit_scale: bool = False,
             disable: bool = False):  # fmt: skip
    """A tqdm bar when stderr is a terminal, else a ``LogProgress``; same calls either way (update, set_postfix,
    close, a context manager)."""
    from tqdm import tqdm

    if disable or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, leave=False,
                    disable=disable, file=sys.stderr)  # fmt: skip
    return LogProgress(desc, unit, total, initial, unit_scale)


class LogProgress:
    """tqdm's counting without the bar: a line on stderr at most every ``LOG_EVERY_S`` seconds."""

    def __init__(self, desc: str, unit: str, total: int | None, initial: int = 0, unit_scale: bool = False):
        self.desc, self.unit, self.total, self.unit_scale = desc, unit, total, unit_scale
        self.n = self.initial = initial
        self.start = self.last = time.monotonic()
        self.postfix: dict = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def line(self, now: float) -> str:
        from tqdm import tqdm

        def count(n: float) -> str:
            return tqdm.format_sizeof(n) if self.unit_scale else f"{n:,.0f}"

        rate = (self.n - self.initial) / max(now - self.start, 1e-9)
        done = count(self.n) + (f"/{count(self.total)}" if self.total is not None else "")
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        speed = count(rate) if rate >= 10 or self.unit_scale else f"{rate:.2g}"  # 0.3 step/s, not "0 step/s"
        return f"{self.desc}: {done} {self.unit} ({speed} {self.unit}/s){extra}"

    def close(self) -> None:
        pass

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""What the benchmark scripts share: running a side in a process of its own with its peak memory, and the CSV rows.

The scripts run as ``python -P bench/NAME.py`` (bench/ off sys.path, so nothing here shadows the standard library)
and import this module by path: ``sys.path.insert(0, os.path.dirname(__file__))``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time


def measure(cmd: list[str], threads: int | None = None) -> tuple[str, str, int]:
    """stdout, stderr and the process's own peak RSS in bytes (from wait4); ``threads`` caps its CPU threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd[:4]} failed:\n{stderr[-3000:]}")
    return stdout, stderr, usage.ru_maxrss * 1024


def write_csv(rows: list[dict], path: str, append: bool = False) -> None:
    """The rows as CSV at ``path`` (its header from the first row); said on stderr."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    new = not (append and os.path.isfile(path))
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"CSV: {path}", file=sys.stderr)


def best_of(fn, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``, after one untimed warm-up call."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best

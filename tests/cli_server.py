"""A fork server for CLI tests: imports llamactl (and torch) once, then runs each request in a forked child.

Each run is a real process running the real entry point (``llamactl.cli.main``) with its own stdin, stdout and
stderr file descriptors, exit code, signals and working directory; only the ~2 s of importing torch is shared.
This process runs no torch op itself, so a child starts its thread pools fresh.

Protocol, one JSON object a line: a request {"argv": [...], "stdin": str or null, "cwd": str, "timeout": s} on
this process's stdin; the answer {"returncode": int, "stdout": str, "stderr": str} on its stdout.
"""

import json
import os
import sys
import tempfile
import threading

import llamactl.cli  # noqa: F401 - imported before forking: what the children share
import llamactl.commands.convert  # noqa: F401
import llamactl.commands.generate  # noqa: F401
import llamactl.commands.pretrain  # noqa: F401
import llamactl.commands.tokenize  # noqa: F401
import llamactl.convert  # noqa: F401
import llamactl.training.lifecycle  # noqa: F401


def child(argv: list[str], stdin_fd: int, out_fd: int, err_fd: int, cwd: str) -> None:
    """In the forked child: become ``llamactl ARGV`` with the given descriptors as 0, 1, 2; never returns."""
    code = 1
    try:
        for fd, target in ((stdin_fd, 0), (out_fd, 1), (err_fd, 2)):
            os.dup2(fd, target)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - the process ends below
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        os.chdir(cwd)
        sys.argv = ["llamactl", *argv]
        from llamactl.cli import main

        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        else:
            code = 0
    except BaseException:  # what escapes main is reported as a crash would be, traceback included
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def serve_one(request: dict) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            child(request["argv"], r, out.fileno(), err.fileno(), request.get("cwd") or os.getcwd())
        os.close(r)
        data = (request.get("stdin") or "").encode("utf-8", "surrogateescape")  # "\udcff" is the byte 0xff

        def feed() -> None:
            try:
                _write_all(w, data)
            except BrokenPipeError:
                pass
            finally:
                os.close(w)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        timer = threading.Timer(request.get("timeout", 300), lambda: os.kill(pid, 9))
        timer.start()
        _, status = os.waitpid(pid, 0)
        timer.cancel()
        feeder.join()
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "returncode": code,
            "stdout": out.read().decode("utf-8", "replace"),
            "stderr": err.read().decode("utf-8", "replace"),
        }


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> None:
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # nothing a child inherits may write into the protocol stream
    for line in sys.stdin:
        if line.strip():
            protocol_out.write(json.dumps(serve_one(json.loads(line))) + "\n")
            protocol_out.flush()


if __name__ == "__main__":
    main()

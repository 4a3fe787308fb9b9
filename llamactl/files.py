"""Paths the user names: inputs checked for what they are, outputs that never destroy, errors that name the path.

Outputs. A regular file (or a new name) is written under a temporary name beside it, fsynced and renamed onto it
when whole, so a crash never leaves a half file that looks whole; a symlink is written through to its target; a
device, FIFO or socket is written in place, as shell redirection does (``-o /dev/null`` stays a device). Every
command checks its outputs (``check_output``) and that no output is one of its inputs (``overlaps``) before any
work. A temporary file is removed when the work fails or is interrupted: ``interrupt_on_signals`` makes SIGTERM and
SIGHUP unwind like Ctrl-C does.

Errors. An ``OSError`` met while writing an output becomes a ``UserError`` naming the output and the reason.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
from collections.abc import Iterator

from llamactl.errors import Interrupted, UserError


def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


def kind_of(path: str) -> str | None:
    """What ``path`` is after following symlinks ("a directory", "a regular file", "a FIFO" ...), None if nothing."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise UserError(f"{path}: {os_reason(e)}") from None
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


def os_reason(e: OSError) -> str:
    """The reason of an OSError in words, without Python's "[Errno N]" and path decorations."""
    return e.strerror or str(e) or type(e).__name__


def input_problem(path: str, what: str, stream_ok: bool = False) -> str | None:
    """Why ``path`` cannot be read as a ``what`` ("checkpoint index", "tokenizer file" ...), or None.

    ``stream_ok``: a FIFO or character device does too (a reader that streams, not one that memory-maps).
    """
    if path == "":
        return f"an empty path is not a {what}"
    kind = kind_of(path)
    if kind is None:
        return f"{path}: no such {what}"
    if kind == "a regular file" or (stream_ok and kind in ("a FIFO", "a character device")):
        return None
    return f"{path}: is {kind}, not a {what}"


def require_input(path: str, what: str, stream_ok: bool = False) -> None:
    problem = input_problem(path, what, stream_ok)
    if problem:
        raise UserError(problem)


def check_output(path: str, flag: str, directory: bool = False) -> str | None:
    """Why ``path`` cannot be written as the output ``flag`` names (a file, or a ``directory``), or None.

    Checked before any work, so that a command that cannot write its result does not start.
    """
    if path == "":
        return f"{flag}: an empty path is not an output"
    if path == "-" and not directory:
        return None
    target = os.path.realpath(path)
    kind = kind_of(target)
    if directory:
        if kind not in (None, "a directory"):
            return f"{flag} {path}: is {kind}, not a directory"
    elif kind == "a directory":
        return f"{flag} {path}: is a directory; give a file name"
    elif kind not in (None, "a regular file"):
        return None  # a device, FIFO or socket is written in place
    if kind == "a directory":
        where = target
    else:
        where = os.path.dirname(target)
        while kind_of(where) is None:
            where = os.path.dirname(where)
        if kind_of(where) != "a directory":
            return f"{flag} {path}: {where} is not a directory"
    if not os.access(where, os.W_OK | os.X_OK):
        return f"{flag} {path}: {where} is not writable"
    return None


def same_file(a: str, b: str) -> bool:
    """Whether two user-named paths are one file (through symlinks and hard links); ``-`` is never a file."""
    if "-" in (a, b) or not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def io_problems(
    inputs: list[tuple[str, str | None, str, bool]], output: str | None = None, output_flag: str = "-o/--output"
) -> list[str]:
    """The path checks of a command that reads files (or ``-``) and writes one file (or ``-``): every given input
    that cannot be read, as (flag, path, what, a FIFO will do), the output that cannot be written, and an output that
    is also an input. A None path (an option not given) and ``-`` (a stream) are not checked as files."""
    given = [(flag, path, what, stream_ok) for flag, path, what, stream_ok in inputs if path and path != "-"]
    problems = [p for _, path, what, stream_ok in given if (p := input_problem(path, what, stream_ok))]
    if output is not None:
        problems += [p for p in [check_output(output, output_flag)] if p]
        problems += overlaps([(output_flag, output)], [(flag, path) for flag, path, *_ in given])
    return problems


def overlaps(outputs: list[tuple[str, str]], inputs: list[tuple[str, str]]) -> list[str]:
    """Outputs that are also inputs, each as (flag, path): a problem line for each, to refuse before any work."""
    return [
        f"{oflag} {opath} is also an input ({f'{iflag} ' if iflag else ''}{ipath}); write to another path"
        for oflag, opath in outputs
        for iflag, ipath in inputs
        if same_file(opath, ipath)
    ]


# ---------------------------------------------------------------------------------------------------- writing


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (the entry, not only the file's data)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else by setting it back."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_temp(directory: str, name: str) -> str:
    """An empty temporary file in ``directory`` for ``name`` (``publish`` puts it in place)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return tmp


def publish(tmp: str, path: str) -> None:
    """Put the finished temporary file ``tmp`` in place at ``path``: data on disk first, then the name.

    It gets the permissions any new file gets (0644 under umask 022), not mkstemp's 0600 (nor those of a writer
    that replaced the temporary file with its own), so that other users and other nodes can read it.
    """
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def named_errors(path: str, *aliases: str | None) -> Iterator[None]:
    """An OSError about ``path`` (or one of its ``aliases``, or about no file at all, as a full disk's) becomes a
    UserError naming ``path``; OSErrors about other files pass."""
    try:
        yield
    except OSError as e:
        if e.filename not in (None, path, *aliases) or (path == "-" and isinstance(e, BrokenPipeError)):
            raise  # another file's error, or the reader of stdout left (`| head`): the CLI's to handle
        raise UserError(f"{display_output(path)}: cannot write ({os_reason(e)})") from None


def display_output(path: str) -> str:
    return "<stdout>" if path == "-" else path


def _is_special(path: str) -> bool:
    return kind_of(path) not in (None, "a regular file", "a directory")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A path to write ``path``'s new contents to, published only if the block succeeds.

    A regular file or a new name: a temporary file beside it, renamed onto it at the end (a symlink is followed,
    so the link stays and its target changes). A device, FIFO or socket: the path itself, written in place.
    """
    if path == "":
        raise UserError("an empty path is not an output")
    target = os.path.realpath(path)
    if kind_of(target) == "a directory":
        raise UserError(f"{path}: is a directory; give a file name")
    if _is_special(target):
        with named_errors(path, target):
            yield target
        return
    directory = os.path.dirname(target)
    tmp = None
    try:
        with signals_held(), named_errors(path, target, directory):
            os.makedirs(directory, exist_ok=True)
            tmp = new_temp(directory, os.path.basename(target))
        with named_errors(path, target, tmp):
            yield tmp
            publish(tmp, target)
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def link_or_copy(src: str, path: str) -> None:
    """``path`` becomes the file ``src`` (a hard link where the filesystem allows, else a copy), atomically."""
    import shutil

    if _is_special(os.path.realpath(path)):
        with atomic_path(path) as dest:
            shutil.copyfile(src, dest)
        return
    with atomic_path(path) as tmp:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


INTERRUPTIONS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Delay SIGINT, SIGTERM and SIGHUP over a few statements that make a file and record its name, so that an
    interruption never falls between the two (and leaves a file nobody will remove)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTIONS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP raise ``Interrupted`` (a KeyboardInterrupt) in the main thread, as Ctrl-C raises
    KeyboardInterrupt: the work unwinds through every ``finally``, and temporary files go with it."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)


def default_signals() -> None:
    """For worker processes: the main process handles interruptions; a worker just ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)

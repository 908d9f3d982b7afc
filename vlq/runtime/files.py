"""Files vlq writes: whole or not at all, and never over something that is not ours to replace.

* :func:`atomic_write` / :func:`atomic_write_text` — readers see the old version or the new one,
  never half of it (a temporary file in the same folder, fsynced, renamed into place).
* :func:`replace_dir` / :func:`recover_interrupted_export` / :func:`check_export_dir` — a checkpoint
  folder is swapped in whole; what a killed export left behind is cleaned up on the next one.
* :func:`link_or_copy` — a second name for a file vlq only ever replaces by rename.
* :func:`kill_point` — test hook: ``VLQ_TEST_KILL_AFTER=<name>`` SIGKILLs the process at that point
  (``calibration``, ``scoring``, ``score-step``, ``manifest``, ``export``, ``export-swap``, ``commit:<entry>``,
  ``serve``), so tests interrupt real runs exactly; ``VLQ_TEST_KILL_SIGNAL=TERM`` sends SIGTERM instead,
  ``STOP`` pauses the process there (a test resumes it with SIGCONT), ``RAISE`` raises an unexpected
  exception there (the CLI's internal-error path).

Nothing here imports torch: the CLI validates paths with it before any heavy import.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import IO, Callable

from .errors import CheckpointError

KILL_ENV = "VLQ_TEST_KILL_AFTER"
KILL_SIGNAL_ENV = "VLQ_TEST_KILL_SIGNAL"  # KILL (default), TERM, or RAISE


def kill_point(name: str) -> None:
    """Interrupt this process when ``VLQ_TEST_KILL_AFTER`` names ``name``: SIGKILL (no cleanup can run),
    SIGTERM (``VLQ_TEST_KILL_SIGNAL=TERM``: the CLI cleans up and exits 143), SIGSTOP (``STOP``: paused
    until a SIGCONT) or an unexpected exception (``RAISE``: the CLI's internal-error line, exit 3)."""
    if os.environ.get(KILL_ENV) != name:
        return
    how = os.environ.get(KILL_SIGNAL_ENV, "KILL").upper()
    if how == "RAISE":
        raise RuntimeError(f"fault injected at kill point {name!r} ({KILL_SIGNAL_ENV}=RAISE)")
    os.kill(os.getpid(), signal.Signals[f"SIG{how}"])


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call ``write(fh)`` on a temporary file in ``path``'s folder, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text))


def link_or_copy(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Make ``dest`` the same file as ``src``: a hard link where the file system allows one, else an
    atomic copy.  For files vlq only ever replaces by rename (:func:`atomic_write`): a later write to
    either name gives that name a new file and leaves the other's untouched."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        with open(src, "rb") as source:
            atomic_write(dest, lambda fh: shutil.copyfileobj(source, fh), binary=True)
    return dest


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").exists()


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place; an existing ``dest`` is swapped out, then removed.

    Killed between the two renames, ``dest`` is missing and ``.dest.old-PID`` holds the previous
    contents: :func:`recover_interrupted_export` puts it back on the next export.
    """
    backup = None
    if dest.exists():
        backup = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, backup)
        kill_point("export-swap")
    try:
        os.replace(tmp, dest)
    except BaseException:
        if backup is not None:
            os.replace(backup, dest)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted_export(export_dir: Path) -> list[str]:
    """Undo what an export killed mid-way left next to ``export_dir`` (by processes no longer alive).

    A ``.NAME.partial-PID-*`` folder is an unfinished export: removed.  A ``.NAME.old-PID`` folder is
    the previous checkpoint swapped out just before the new one moved in: restored when
    ``export_dir`` is missing (the kill came between the two renames), else removed.
    """
    export_dir = Path(export_dir)
    parent = export_dir.parent
    actions: list[str] = []
    if not parent.is_dir():
        return actions
    pattern = re.compile(rf"^\.{re.escape(export_dir.name)}\.(partial|old)-(\d+)(-.*)?$")
    for entry in sorted(parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or not entry.is_dir() or pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not export_dir.exists():
            os.replace(entry, export_dir)
            actions.append(f"restored the previous checkpoint from {entry.name}")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            actions.append(f"removed {entry.name} left by an interrupted export")
    return actions


def check_export_dir(export_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work, to write over something that is not ours to replace."""
    export_dir = Path(export_dir)
    recover_interrupted_export(export_dir)
    if export_dir.exists() and not export_dir.is_dir():
        raise CheckpointError(f"Export path {export_dir} is a file; pass a folder path.")
    if export_dir.exists() and any(export_dir.iterdir()) and not overwrite:
        what = "a checkpoint" if _is_checkpoint_dir(export_dir) else "files"
        raise CheckpointError(
            f"Export folder {export_dir} already holds {what}. Pass overwrite=True (--overwrite) to "
            "replace it, or choose an empty folder."
        )
    parent = export_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"Cannot write to {parent}; choose a writable export folder.")

"""One writer per run folder, and the files that describe each other replaced together (issue 22).

* :class:`RunLock` — an exclusive lock on a run folder for a command's whole life.  ``.vlq.lock``
  holds the holder's pid, host, command line and start time (JSON) and is ``flock``-ed.  The flock is
  what excludes: the kernel drops it when its holder dies, however it dies, so a lock file whose flock
  is free was left by a process that is gone and is taken over (with a note).  The JSON is what names
  the holder in the refusal.  The file is opened without ``O_EXCL`` and re-checked after the flock (the
  same inode is still at the path), so a holder that removes it on release never lets two processes
  in.  A lock written on another host cannot be probed from here (flocks do not reliably reach across
  NFS clients): refused, naming it and how to remove it.  A folder is refused too while the folder
  around it (a sweep around its targets) or a folder directly inside it is locked by another process.
* :func:`writing` — while a command runs, every file of the set (``manifest.json`` with its fidelity
  block, ``search_state.pth`` + settings, ``checkpoint/``, ``sweep.json``, target and comparison
  sub-folders) is written into ``.vlq.staging-PID/``.  At the end the new entries are moved in by
  renames, under a marker (``.vlq.commit``) that lists them: a command that stops before the marker
  leaves the previous set as it was (its staging is removed by the next writer); one that stops among
  the renames is rolled forward by the next writer (:func:`recover`), or at once when it can still run
  code.  A staging folder beside the files (not in the system's temporary folder) keeps every move a
  rename on one file system.
* A search not yet committed keeps its state in ``.vlq.pending/`` (seeded from the committed state,
  whose saved scores it re-solves): it survives interruptions, so the same command resumes, and
  becomes ``search_state.pth`` only together with the manifest it produced.

Test hook: ``VLQ_TEST_UNLOCKED=1`` turns both off (no lock, every file written in place, as before the
lock existed) — only so the fault suite can show what two unlocked writers do.

Nothing here imports torch: the CLI takes the lock before any heavy import, so a refusal is immediate.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shlex
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import CheckpointError, LockHeld
from .files import atomic_write_text, kill_point, link_or_copy, pid_alive, replace_dir
from ..inputs.requests import RunFolder

UNLOCKED_ENV = "VLQ_TEST_UNLOCKED"
#: How long a lock whose file names no live holder is retried before the refusal: a holder that has
#: just created the file, or another process probing it, lets go within milliseconds.
SETTLE_S = 0.5
_SCRATCH = ".scratch"  # inside a staging folder: files a command needs but never commits


def unguarded() -> bool:
    """``VLQ_TEST_UNLOCKED=1``: no lock and no staging (the fault suite's negative control)."""
    return os.environ.get(UNLOCKED_ENV) == "1"


def _key(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _command_line() -> str:
    return shlex.join([Path(sys.argv[0]).name or "python", *sys.argv[1:]])


# ------------------------------------------------------------------------------------------------
# The lock
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a run folder's lock, as its lock file says."""

    pid: int
    host: str
    command: str
    started: str  # local time, to the second

    @classmethod
    def this_process(cls, command: str) -> "LockHolder":
        return cls(os.getpid(), socket.gethostname(), command, time.strftime("%Y-%m-%d %H:%M:%S"))

    @classmethod
    def from_text(cls, text: str) -> "LockHolder | None":
        """None for an empty file (a holder that has not written itself yet) or one vlq did not write."""
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["command"]), str(data["started"]))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "command": self.command, "started": self.started}) + "\n"

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def describe(self) -> str:
        where = "" if self.on_this_host else f" on host {self.host}"
        return f"pid {self.pid}{where} ({self.command}, started {self.started})"


#: Run folders this process holds the lock of (resolved path -> its lock): taking it again joins it.
_held: dict[Path, "RunLock"] = {}


class RunLock:
    """Hold ``folder``'s lock for the ``with`` block, or raise :class:`LockHeld` naming who holds it.

    Re-entrant within one process (a pipeline stage inside a CLI command joins the command's lock).
    After taking it, whatever a writer that is gone left behind is finished or removed
    (:func:`recover`); ``notes`` says what was done, including a stale lock taken over, one line each.
    The folder is created when missing and removed again on release if nothing was written into it.
    """

    def __init__(self, folder: RunFolder | str | os.PathLike, command: str | None = None):
        self.folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
        self.command = command or _command_line()
        self.notes: list[str] = []
        self._fd: int | None = None
        self._key: Path | None = None
        self._created = False

    def __enter__(self) -> "RunLock":
        if unguarded():
            return self
        root = self.folder.root
        if _key(root) in _held:
            return self  # this process holds it already
        self._created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"Cannot create the run folder {root} ({exc.strerror or exc}); choose another folder.") from exc
        try:
            self._fd, previous = _acquire(self.folder, LockHolder.this_process(self.command))
        except BaseException:
            self._remove_if_created()
            raise
        self._key = _key(root)
        _held[self._key] = self
        try:
            _refuse_busy_neighbours(self.folder, self._key)
            if previous is not None:
                gone = "is no longer running" if not pid_alive(previous.pid) else "no longer holds it"
                self.notes.append(f"took over the lock of {root}: {previous.describe()} left it and {gone}")
            self.notes += recover(self.folder)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            self._release()
        return False

    def _release(self) -> None:
        _held.pop(self._key, None)
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.folder.lock):
                os.unlink(self.folder.lock)  # before the flock goes: nobody can take a file about to vanish
        finally:
            os.close(fd)
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self._created:
            with contextlib.suppress(OSError):
                self.folder.root.rmdir()  # only if empty: a refused command leaves nothing behind


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_fd(fd: int) -> LockHolder | None:
    return LockHolder.from_text(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))


def _acquire(folder: RunFolder, me: LockHolder) -> tuple[int, LockHolder | None]:
    """The flocked lock file's descriptor, with ``me`` written in it, and the holder it named before
    (a process that is gone), or :class:`LockHeld`."""
    path = folder.lock
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CheckpointError(f"Cannot create the lock file {path} ({exc.strerror or exc}); choose a writable folder.") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_fd(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"Cannot lock {path} ({exc.strerror or exc}); vlq needs a file system with flock.") from exc
            settling = holder is None or (holder.on_this_host and not pid_alive(holder.pid))
            if settling and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise LockHeld(_in_use(folder, holder)) from None
        if not _same_file(fd, path):  # its holder removed it while releasing: lock the new file
            os.close(fd)
            continue
        previous = _read_fd(fd)
        if previous is not None and not previous.on_this_host:
            os.close(fd)
            raise LockHeld(
                f"Run folder {folder.root} is locked by {previous.describe()}; vlq cannot tell from "
                f"{socket.gethostname()} whether that process still runs. If it does not, delete {path} and run again."
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.to_json().encode(), 0)
        os.fsync(fd)
        return fd, previous


def _in_use(folder: RunFolder, holder: LockHolder | None) -> str:
    if holder is None:
        who = f"another process (its lock file {folder.lock} names no holder yet)"
    elif holder.on_this_host and not pid_alive(holder.pid):
        who = f"{holder.describe()}, which has ended, but a process it started still holds the lock"
    else:
        who = holder.describe()
    return f"Run folder {folder.root} is in use by {who}; one writer per run folder: wait for it to finish, or use another folder."


def _probe(lock: Path) -> tuple[bool, LockHolder | None]:
    """Whether another process holds ``lock`` (a shared flock, dropped at once), and who it names."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True, _read_fd(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


def _refuse_busy_neighbours(folder: RunFolder, key: Path) -> None:
    """A sweep writes its target folders, a comparison its per-scheme folders: a folder inside one
    that another process is writing, or one holding a folder another process is writing, is refused."""
    for parent in key.parents:
        if parent in _held:
            continue
        held, holder = _probe(parent / RunFolder.LOCK)
        if held:
            who = holder.describe() if holder is not None else "another process"
            raise LockHeld(f"Run folder {folder.root} is inside {parent}, which {who} is writing (the folders in it "
                           "included); one writer per run folder: wait for it to finish, or use another folder.")
    for child in sorted(key.iterdir()):
        lock = child / RunFolder.LOCK
        if child.name.startswith(".") or _key(child) in _held or not lock.exists():
            continue
        held, holder = _probe(lock)
        if held:
            who = holder.describe() if holder is not None else "another process"
            raise LockHeld(f"Run folder {folder.root} holds {child.name}/, which {who} is writing; one writer per run "
                           "folder: wait for it to finish, or use another folder.")


# ------------------------------------------------------------------------------------------------
# Writing a set of files together
# ------------------------------------------------------------------------------------------------


@dataclass
class _Commit:
    root: Path  # the run folder (resolved)
    staging: Path
    search_state_changed: bool = False


#: Run folders this process is writing now (resolved path -> its staging): a nested stage joins.
_open: dict[Path, _Commit] = {}


@dataclass(frozen=True)
class Staged:
    """Where one command writes a run folder's files until they are committed together (:func:`writing`).

    ``folder`` is where they live once committed (read the previous set there); ``root`` is where the
    command writes them now — ``folder.root`` itself when unguarded.
    """

    folder: RunFolder
    root: Path
    _commit: _Commit | None = field(default=None, repr=False, compare=False)
    joined: bool = False  # part of a larger command's set (`vlq run`'s search, a sweep's target): committed with it

    @property
    def manifest(self) -> Path:
        return self.root / RunFolder.MANIFEST

    @property
    def checkpoint(self) -> Path:
        return self.root / RunFolder.CHECKPOINT

    @property
    def sweep(self) -> Path:
        return self.root / RunFolder.SWEEP

    @property
    def commits(self) -> bool:
        """The block this stage was opened for ends with the commit (guarded, and not joined)."""
        return self._commit is not None and not self.joined

    def target(self, bits: float) -> "Staged":
        sub = self.folder.target(bits)
        return Staged(sub, self.root / sub.root.name, self._commit, joined=True)

    @property
    def search_state(self) -> Path:
        """Where this command's search reads and writes its state: the pending state (committed with
        the manifest), or — unguarded — the committed one itself."""
        return self.folder.pending_search_state if self._commit is not None else self.folder.search_state

    def scratch(self, path: Path) -> Path:
        """A private name for the committed file ``path``, to work on without committing it (restoring
        a search lets ModelOpt save its state again); ``path`` itself when unguarded."""
        if self._commit is None:
            return path
        return self._commit.staging / _SCRATCH / Path(path).name

    def committed(self, path: Path) -> Path:
        """Where ``path`` (written under ``root``) will be once committed."""
        return self.folder.root / Path(path).relative_to(self.root)

    def search_state_written(self) -> None:
        """This command searched into :attr:`search_state`: commit it with the manifest."""
        if self._commit is not None:
            self._commit.search_state_changed = True


@contextlib.contextmanager
def writing(folder: RunFolder) -> Iterator[Staged]:
    """Stage ``folder``'s files for the ``with`` block; commit them together when it ends normally.

    Holds the folder's lock (taking it unless this process already does).  A block that raises leaves
    the previous files untouched (the pending search state stays, for the resume); inside another
    command's block for the same folder, or a folder around it, the stage joins that command's set.
    """
    key = _key(folder.root)
    for root, commit in _open.items():
        if key == root or root in key.parents:
            yield Staged(folder, commit.staging / key.relative_to(root), commit, joined=True)
            return
    if unguarded():
        yield Staged(folder, folder.root)
        return
    with RunLock(folder):
        staging = key / f"{RunFolder.STAGING_PREFIX}{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        commit = _Commit(key, staging)
        _open[key] = commit
        try:
            yield Staged(folder, staging, commit)
            _commit_staged(commit)
        finally:
            del _open[key]
            if not (key / RunFolder.COMMIT).exists():  # a commit that could not finish is rolled forward later
                shutil.rmtree(staging, ignore_errors=True)


def _commit_order(staging: Path):
    def rank(name: str) -> tuple[int, str]:
        if name.startswith(RunFolder.SEARCH_STATE):
            return 0, name
        if name in (RunFolder.MANIFEST, RunFolder.SWEEP):
            return 3, name  # the files that describe the others go last
        return (1 if (staging / name).is_dir() else 2), name
    return rank


def _commit_staged(commit: _Commit) -> None:
    root, staging = commit.root, commit.staging
    if commit.search_state_changed:
        pending = root / RunFolder.PENDING
        for state in sorted(pending.iterdir()) if pending.is_dir() else ():
            if not state.name.startswith("."):
                link_or_copy(state, staging / state.name)
    entries = sorted((p.name for p in staging.iterdir() if not p.name.startswith(".")), key=_commit_order(staging))
    if not entries:
        return
    marker = root / RunFolder.COMMIT
    atomic_write_text(marker, json.dumps({"pid": os.getpid(), "staging": staging.name, "entries": entries,
                                          "pending": commit.search_state_changed}) + "\n")
    try:
        _move_in(root, staging, entries, committing=True)
        if commit.search_state_changed:
            shutil.rmtree(root / RunFolder.PENDING, ignore_errors=True)
    except BaseException:
        # some entries replaced their old versions already: only forward is whole
        with contextlib.suppress(Exception):
            _move_in(root, staging, entries)
            if commit.search_state_changed:
                shutil.rmtree(root / RunFolder.PENDING, ignore_errors=True)
            marker.unlink()
        raise
    marker.unlink()


def _move_in(root: Path, staging: Path, entries: list[str], *, committing: bool = False) -> None:
    """Move each staged entry over its old version; entries already moved are skipped (rolling forward)."""
    for name in entries:
        src, dest = staging / name, root / name
        if os.path.lexists(src):
            if src.is_dir() and dest.is_dir() and not dest.is_symlink():
                replace_dir(src, dest)
            else:
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                os.replace(src, dest)
        if dest.exists():  # a previous version swapped out by a replace_dir that was interrupted
            for backup in root.glob(f".{glob.escape(name)}.old-*"):
                shutil.rmtree(backup, ignore_errors=True)
        if committing:
            kill_point(f"commit:{name}")


def recover(folder: RunFolder) -> list[str]:
    """Finish, or remove, what a writer that is gone left in ``folder``; call it holding the lock.

    A commit marker: its entries are moved in (rolled forward).  A staging folder without one: the
    command stopped before committing, its files are removed and the previous set stands.  The pending
    search state is kept (the same command resumes from it).  Returns one note per thing done.
    """
    root = folder.root
    notes: list[str] = []
    marker = root / RunFolder.COMMIT
    if marker.exists():
        try:
            commit = json.loads(marker.read_text())
            entries, staging, pid = list(commit["entries"]), root / commit["staging"], commit["pid"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"The commit marker {marker} cannot be read ({exc}); delete it and the "
                                  f"{RunFolder.STAGING_PREFIX}* folders beside it, then check the run folder.") from exc
        _move_in(root, staging, entries)
        if commit.get("pending"):
            shutil.rmtree(root / RunFolder.PENDING, ignore_errors=True)
        marker.unlink()
        shutil.rmtree(staging, ignore_errors=True)
        notes.append(f"{root}: finished moving in {', '.join(entries)}, which pid {pid} was committing together when it stopped")
    for staging in sorted(root.glob(f"{glob.escape(RunFolder.STAGING_PREFIX)}*")):
        pid = staging.name[len(RunFolder.STAGING_PREFIX):]
        shutil.rmtree(staging, ignore_errors=True)
        notes.append(f"{root}: removed the unfinished files of pid {pid} ({staging.name}); the files they would have "
                     "replaced are unchanged")
    return notes


__all__ = ["LockHolder", "RunLock", "Staged", "recover", "unguarded", "writing"]

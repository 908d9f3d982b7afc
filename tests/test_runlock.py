"""One writer per run folder, files replaced together (issue 22): the lock and the commit on plain files.

The lock, held by a real second process: a writer is refused at once naming the holder; a lock left by
a dead process is taken over with a note; one written on another host is refused with how to remove
it; a folder inside (or around) one being written is refused.  The commit: a run folder's files are
replaced together or not at all, the pending search state with them.  Every case has its negative
control.  Whole ``vlq`` runs on one folder, killed and raced: ``tests/test_faults.py`` section 4.
Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vlq.runtime.errors import LockHeld
from vlq.runtime.files import KILL_ENV, KILL_SIGNAL_ENV
from vlq.inputs.requests import RunFolder
from vlq.runtime.runlock import LockHolder, RunLock, writing

# holds RunLock(argv[1]) until its stdin closes
_HOLD = (
    "import sys\n"
    "from vlq.runtime.runlock import RunLock\n"
    "with RunLock(sys.argv[1], command='holder ' + sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    sys.stdin.readline()\n"
)


@contextlib.contextmanager
def held(folder: Path):
    """Another process holding ``folder``'s lock for the block."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked", "the holder did not take the lock"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _hidden(folder: Path) -> list[str]:
    """Lock, staging, marker and pending entries left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".vlq."))


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    with held(folder) as holder:
        with pytest.raises(LockHeld, match=rf"^Run folder {re.escape(str(folder))} is in use by pid {holder.pid} "
                                           rf"\(holder {re.escape(str(folder))}, started [-0-9]+ [0-9:]+\); one writer per run "
                                           "folder: wait for it to finish, or use another folder.$"):
            with RunLock(folder):
                pass
        assert _hidden(folder) == [".vlq.lock"], "the refused process left the holder's lock alone"
    # negative control: once the holder has ended, the folder is free (it removed its lock: no stale note)
    with RunLock(folder) as lock:
        assert lock.notes == [] and LockHolder.from_text(folder.joinpath(".vlq.lock").read_text()).pid == os.getpid()
    assert not folder.exists(), "a lock that created its folder and wrote nothing removes it again"


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = _dead_pid()
    (folder / ".vlq.lock").write_text(LockHolder(dead, socket.gethostname(), "vlq run --out run", "2026-12-01 10:00:00").to_json())
    with RunLock(folder) as lock:
        assert lock.notes == [f"took over the lock of {folder}: pid {dead} (vlq run --out run, started 2026-12-01 10:00:00) "
                              "left it and is no longer running"]
        assert LockHolder.from_text((folder / ".vlq.lock").read_text()).pid == os.getpid()
    assert _hidden(folder) == []


def test_a_lock_from_another_host_is_refused_and_left_in_place(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    text = LockHolder(4242, "other-host", "vlq sweep --out run", "2026-12-01 10:00:00").to_json()
    (folder / ".vlq.lock").write_text(text)
    with pytest.raises(LockHeld, match=r"is locked by pid 4242 on host other-host \(vlq sweep --out run, started 2026-12-01 "
                                       r"10:00:00\); vlq cannot tell from .* whether that process still runs\. If it does not, "
                                       rf"delete {re.escape(str(folder / '.vlq.lock'))} and run again\.$"):
        with RunLock(folder):
            pass
    assert (folder / ".vlq.lock").read_text() == text, "another host's lock is never taken over from here"
    (folder / ".vlq.lock").unlink()  # negative control: what the message says to do frees the folder
    with RunLock(folder) as lock:
        assert lock.notes == []


def test_a_folder_inside_or_around_one_being_written_is_refused(tmp_path):
    sweep = tmp_path / "sweep"
    target = sweep / "6b"
    with held(sweep) as holder:
        with pytest.raises(LockHeld, match=rf"{re.escape(str(target))} is inside {re.escape(str(sweep))}, which pid {holder.pid} "
                                           r"\(holder .*\) is writing \(the folders in it included\)"):
            with RunLock(target):
                pass
        assert not target.exists(), "a refused command leaves nothing behind"
    with held(target) as holder:
        with pytest.raises(LockHeld, match=rf"{re.escape(str(sweep))} holds 6b/, which pid {holder.pid} \(holder .*\) is writing"):
            with RunLock(sweep):
                pass
    # negative control: one process may hold a folder and then one inside it (a sweep writing its targets)
    with RunLock(sweep), RunLock(target) as inner:
        assert inner.notes == []


def _write_set(root: Path, version: str) -> None:
    """A stand-in set: a manifest and the checkpoint it describes, each naming ``version``."""
    (root / "checkpoint").mkdir(parents=True, exist_ok=True)
    (root / "checkpoint" / "config.json").write_text(version)
    (root / "manifest.json").write_text(version)


def _read_set(root: Path) -> tuple[str, str]:
    return (root / "manifest.json").read_text(), (root / "checkpoint" / "config.json").read_text()


def test_a_set_is_replaced_together_or_not_at_all(tmp_path):
    folder = RunFolder(tmp_path / "run")
    _write_set(folder.root, "old")
    with pytest.raises(RuntimeError, match="stopped between its writes"):
        with writing(folder) as staged:
            staged.manifest.write_text("new")
            raise RuntimeError("stopped between its writes")
    assert _read_set(folder.root) == ("old", "old") and _hidden(folder.root) == []
    # negative control: the same block, run to its end, replaces both at once
    with writing(folder) as staged:
        _write_set(staged.root, "new")
        assert _read_set(folder.root) == ("old", "old"), "nothing moves in before the block ends"
    assert _read_set(folder.root) == ("new", "new") and _hidden(folder.root) == []


def test_the_pending_search_state_is_committed_with_its_manifest_and_kept_for_a_resume(tmp_path):
    folder = RunFolder(tmp_path / "run")
    _write_set(folder.root, "v1")
    folder.search_state.write_text("state v1")
    with pytest.raises(RuntimeError):
        with writing(folder) as staged:
            staged.search_state.parent.mkdir()
            staged.search_state.write_text("state v2")
            staged.search_state_written()
            raise RuntimeError("stopped after the search")
    assert folder.search_state.read_text() == "state v1" and folder.pending_search_state.read_text() == "state v2", \
        "the committed state stays; the interrupted search's state is kept for the resume"
    with writing(folder) as staged:  # the resumed command
        assert staged.search_state == folder.pending_search_state
        staged.search_state_written()
        _write_set(staged.root, "v2")
    assert folder.search_state.read_text() == "state v2" and _read_set(folder.root) == ("v2", "v2")
    assert _hidden(folder.root) == [], "the pending state became the committed one"
    # negative control: a command that did not search leaves the state alone
    folder.pending_search_state.parent.mkdir()
    folder.pending_search_state.write_text("state of another search")
    with writing(folder) as staged:
        _write_set(staged.root, "v3")
    assert folder.search_state.read_text() == "state v2" and folder.pending_search_state.exists()


def test_a_commit_stopped_by_an_exception_between_its_renames_is_finished_at_once(tmp_path, monkeypatch):
    """An exception (or SIGTERM) among the renames: the process still runs code, so it rolls forward
    before the error ends it (a SIGKILL there is rolled forward by the next writer: tests/test_faults.py)."""
    folder = RunFolder(tmp_path / "run")
    _write_set(folder.root, "old")
    monkeypatch.setenv(KILL_ENV, "commit:checkpoint")
    monkeypatch.setenv(KILL_SIGNAL_ENV, "RAISE")
    with pytest.raises(RuntimeError, match="fault injected at kill point 'commit:checkpoint'"):
        with writing(folder) as staged:
            _write_set(staged.root, "new")
    assert _read_set(folder.root) == ("new", "new") and _hidden(folder.root) == []

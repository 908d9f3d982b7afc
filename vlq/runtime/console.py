"""Keep the terminal for vlq: third-party output (ModelOpt's prints and warnings, transformers and vLLM
logs, C-level writes of extensions) goes to the run's ``log.txt`` while a command runs.

Both the Python streams and file descriptors 1 and 2 are redirected, so prints from ModelOpt, Python
warnings and output written by compiled code or child processes all land in the log.  vlq's own
lines and progress bars go to the stream :func:`third_party_to_log` yields: the real terminal.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Iterator

#: The log of the command running now (set by :func:`third_party_to_log`, kept after it ends so the
#: CLI can name it in an error line).
_current_log: Path | None = None


def current_log() -> Path | None:
    return _current_log


def error_log_path() -> Path:
    """Where a command without a run folder writes a trace: ``$VLQ_CACHE_DIR/logs`` (~/.cache/vlq/logs)."""
    from .cache import default_cache_dir

    return default_cache_dir() / "logs" / f"vlq-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def log_exception(exc: BaseException, log_path: str | os.PathLike | None = None) -> Path | None:
    """Append ``exc``'s full trace to the command's log (or a fresh one); return the log's path.

    Never raises: a log that cannot be written (a full disk) gives ``None``, and the caller's one-line
    message still goes out.
    """
    global _current_log
    path = Path(log_path) if log_path is not None else (_current_log or error_log_path())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8", errors="replace") as fh:
            fh.write(f"\n===== vlq trace {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
            fh.write("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    _current_log = path
    return path


def _own_stream(stream: IO[str]) -> tuple[IO[str], int | None]:
    """A stream that keeps writing where ``stream`` writes now, even after fds 1/2 are redirected."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return stream, None  # not backed by a descriptor (e.g. pytest's capsys): keep the object
    dup = os.dup(fd)
    return os.fdopen(dup, "w", buffering=1, encoding="utf-8", errors="replace", closefd=True), dup


@contextlib.contextmanager
def third_party_to_log(log_path: str | os.PathLike | None, *, verbose: bool = False) -> Iterator[IO[str]]:
    """Redirect everything but vlq's own output to ``log_path``; yield the terminal stream.

    With ``verbose`` (or no log path) nothing is redirected and the terminal is ``sys.stdout``.
    """
    global _current_log
    if log_path is not None:
        _current_log = Path(log_path)  # traces go here even with --verbose
    if verbose or log_path is None:
        yield sys.stdout
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal, own_fd = _own_stream(sys.stdout)
    saved_fds = (os.dup(1), os.dup(2))
    saved_streams = (sys.stdout, sys.stderr)
    with open(log_path, "a", buffering=1, encoding="utf-8", errors="replace") as log:
        log.write(f"\n===== vlq {' '.join(sys.argv[1:])} — {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        try:
            yield terminal
        finally:
            log.flush()
            sys.stdout, sys.stderr = saved_streams
            _repoint_log_handlers(log, saved_streams[1])
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            if own_fd is not None:
                terminal.close()


def _repoint_log_handlers(log: IO[str], stream: IO[str]) -> None:
    """Logging handlers a library created during the session write to ``log``, which closes with it; point
    them back at ``stream`` so a later log line in the same process (a second command, a test) is not lost."""
    import logging

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is log:
                handler.setStream(stream)
            if getattr(handler.__dict__.get("flush"), "__self__", None) is log:  # transformers binds sys.stderr.flush
                handler.flush = stream.flush

"""Plain helpers shared by the test modules (fixtures live in the root ``conftest.py``).

* :func:`vlq_cli` — the command line as users run it, in a subprocess, timed, with the heavy
  libraries it imported; :func:`start_vlq_cli` starts one in the background (two at once on one folder);
* :func:`tampered_copy` — a checkpoint copied with chosen tensors doubled on disk (negative controls);
* :func:`search_variants` / :func:`variant_params` — the variant matrix (``tests/matrix/search_variants.yaml``).

The model copy and the calibration helpers are the product's own: ``vlq.pipeline.fresh_copy`` and
``vlq.data.calibration.synthetic_text_calibration`` (capped below the vision markers).
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from vlq.search.scheme import SCHEME_FIELDS, Scheme

# ------------------------------------------------------------------------------------------------
# The CLI in a subprocess
# ------------------------------------------------------------------------------------------------

#: Libraries a refused input must not have paid for.
HEAVY_MODULES = ("torch", "transformers", "modelopt", "vllm")

# `python -m vlq.cli ARGS`, plus an exit hook that writes which heavy modules were imported to a file
# (stdout and stderr stay exactly what a user sees).
_ENTRY = (
    "import atexit, runpy, sys\n"
    "marker = sys.argv[1]\n"
    "def _heavy():\n"
    f"    names = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
    "    with open(marker, 'w') as f:\n"
    "        f.write(' '.join(names))\n"
    "atexit.register(_heavy)\n"
    "sys.argv = ['vlq', *sys.argv[2:]]\n"
    "runpy.run_module('vlq.cli', run_name='__main__', alter_sys=True)\n"
)


@dataclass(frozen=True)
class CliRun:
    """One finished ``vlq`` process."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # wall time of the whole process, interpreter start included
    heavy_imports: tuple[str, ...] | None  # of HEAVY_MODULES, those loaded at exit; None when it did not exit (killed)

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("vlq: error:")]

    @property
    def check_results(self) -> list[tuple[str, str]]:
        """(check name, PASS/FAIL) of every row of the check tables printed on stdout, in order."""
        rows = []
        for line in self.stdout.splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) >= 4 and cells[2] in ("PASS", "FAIL"):
                rows.append((cells[1], cells[2]))
        return rows

    def tail(self, n: int = 3000) -> str:
        """The end of both streams, for assertion messages."""
        return f"$ vlq {' '.join(self.args)}  (exit {self.returncode}, {self.seconds:.1f}s)\n" \
               f"--- stdout ---\n{self.stdout[-n:]}\n--- stderr ---\n{self.stderr[-n:]}"


def vlq_cli(*args: str, cwd: str | os.PathLike, kill_after: str | None = None, kill_signal: str = "KILL",
            env: dict[str, str] | None = None, file_size_limit: int | None = None, timeout: float = 600) -> CliRun:
    """Run ``vlq ARGS`` in a fresh interpreter in ``cwd``.

    ``kill_after`` names a :func:`vlq.runtime.files.kill_point` at which the process interrupts itself with
    ``kill_signal`` (``KILL``, ``TERM``, or ``RAISE`` for an unexpected exception).  ``file_size_limit``
    caps every file the process writes (``RLIMIT_FSIZE``, with SIGXFSZ ignored so writes fail with EFBIG,
    as on a full disk).  The tiny model's build cache goes to ``cwd/.vlq-cache`` unless ``VLQ_CACHE_DIR``
    is already set, so nothing is written outside the test's folder.
    """
    with start_vlq_cli(*args, cwd=cwd, kill_after=kill_after, kill_signal=kill_signal, env=env,
                       file_size_limit=file_size_limit) as started:
        return started.finish(timeout=timeout)


class StartedCli:
    """A ``vlq`` process running in the background (:func:`start_vlq_cli`); use it as a context manager
    so a process a test left stopped or running is killed when the test ends."""

    def __init__(self, args: tuple[str, ...], argv: list[str], cwd, env: dict[str, str], preexec_fn):
        self.args = args
        self._tmp = tempfile.TemporaryDirectory(prefix="vlq-cli-")
        tmp = Path(self._tmp.name)
        self._marker, self._out, self._err = tmp / "heavy_imports", tmp / "stdout", tmp / "stderr"
        self.start = time.perf_counter()
        # output to files, not pipes: a long run would block on a full pipe nobody reads while it runs
        with open(self._out, "w") as out, open(self._err, "w") as err:
            self.proc = subprocess.Popen([*argv[:3], str(self._marker), *argv[3:]], cwd=cwd, env=env, stdout=out,
                                         stderr=err, text=True, preexec_fn=preexec_fn)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_until_stopped(self, timeout: float = 600) -> None:
        """Block until the process stopped itself (``kill_signal="STOP"`` at its kill point)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the process ended before its kill point\n{self.finish().tail()}")
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            if stat[stat.rindex(")") + 2] == "T":
                return
            time.sleep(0.1)
        raise AssertionError(f"the process did not reach its kill point within {timeout:.0f}s")

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def finish(self, timeout: float = 600) -> CliRun:
        """Wait for the process to end; what it did."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        seconds = time.perf_counter() - self.start
        heavy = tuple(self._marker.read_text().split()) if self._marker.exists() else None
        return CliRun(self.args, self.proc.returncode, self._out.read_text(), self._err.read_text(), seconds, heavy)

    def __enter__(self) -> "StartedCli":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._tmp.cleanup()


def start_vlq_cli(*args: str, cwd: str | os.PathLike, kill_after: str | None = None, kill_signal: str = "KILL",
                  env: dict[str, str] | None = None, file_size_limit: int | None = None) -> StartedCli:
    """Start ``vlq ARGS`` like :func:`vlq_cli` without waiting for it; ``kill_signal="STOP"`` pauses it at
    ``kill_after`` (:meth:`StartedCli.wait_until_stopped`, then :meth:`StartedCli.resume`)."""
    from vlq.runtime.files import KILL_ENV, KILL_SIGNAL_ENV

    args = tuple(str(a) for a in args)
    full_env = dict(os.environ)
    full_env.pop(KILL_ENV, None)
    full_env.pop(KILL_SIGNAL_ENV, None)
    full_env.setdefault("VLQ_CACHE_DIR", str(Path(cwd) / ".vlq-cache"))
    full_env.update(env or {})
    if kill_after:
        full_env[KILL_ENV] = kill_after
        full_env[KILL_SIGNAL_ENV] = kill_signal

    def limit_file_size():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: a too-large write fails, no core dump
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return StartedCli(args, [sys.executable, "-c", _ENTRY, *args], cwd, full_env,
                      limit_file_size if file_size_limit is not None else None)


# ------------------------------------------------------------------------------------------------
# Checkpoints changed on disk (negative controls)
# ------------------------------------------------------------------------------------------------


def tampered_copy(path, dest, *, keys_to_double):
    """``path`` copied to ``dest`` (hard links) with the tensors ``keys_to_double`` picks doubled on disk."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(path, dest, copy_function=os.link)
    index = dest / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    doubled = []
    for shard in shards:
        tensors = load_file(dest / shard)
        keys = keys_to_double(tensors)
        if not keys:
            continue
        for key in keys:
            tensors[key] = (tensors[key].to(torch.float32) * 2).to(tensors[key].dtype)
        doubled += keys
        (dest / shard).unlink()  # a hard link: writing through it would change the original too
        save_file(tensors, dest / shard, metadata={"format": "pt"})
    assert doubled, f"{path}: nothing to tamper with"
    return doubled


def down_proj_tensor_scales(tensors) -> list[str]:
    """Each quantized down_proj's per-tensor float32 weight scale: NVFP4's ``weight_scale_2``, FP8's ``weight_scale``."""
    import torch

    layers = {k.rsplit(".", 1)[0] for k in tensors if ".mlp.down_proj.weight_scale" in k}
    return [f"{layer}.weight_scale_2" if f"{layer}.weight_scale_2" in tensors else f"{layer}.weight_scale"
            for layer in sorted(layers) if tensors.get(f"{layer}.weight_scale_2", tensors[f"{layer}.weight_scale"]).dtype == torch.float32]


# ------------------------------------------------------------------------------------------------
# The variant matrix
# ------------------------------------------------------------------------------------------------

MATRIX = Path(__file__).resolve().parent / "matrix" / "search_variants.yaml"
LANES = ("cpu", "gpu")
#: Keys every entry names: its lane and the scheme's own YAML keys (vlq.search.scheme.SCHEME_FIELDS) but these,
#: which keep their scheme defaults unless given.
_OPTIONAL = {"batch_size", "kv_cache_fp8"}
_REQUIRED = {"lane", *SCHEME_FIELDS} - _OPTIONAL


@dataclass(frozen=True)
class SearchedExport:
    """One search through :mod:`vlq.pipeline` and its export, as the test modules keep them."""

    searched: object  # vlq.pipeline.Searched (kept untyped: helpers import no torch)
    exported: object  # vlq.pipeline.Exported

    @property
    def result(self):
        return self.searched.result

    @property
    def manifest(self):
        return self.searched.manifest


class MatrixError(ValueError):
    """A variant entry that does not describe one search."""


@dataclass(frozen=True)
class MatrixVariant:
    """One entry of the matrix file: the scheme it searches and its lane."""

    scheme: Scheme
    lane: str

    @property
    def id(self) -> str:
        return self.scheme.id

    def param(self):
        """A ``pytest.param`` of the scheme with the variant's id."""
        import pytest

        return pytest.param(self.scheme, id=self.id)


def variant_from_entry(entry: dict) -> MatrixVariant:
    """One YAML entry -> the variant it names."""
    if not isinstance(entry, dict):
        raise MatrixError(f"A variant must be a mapping, got {entry!r}.")
    missing, unknown = sorted(_REQUIRED - set(entry)), sorted(set(entry) - _REQUIRED - _OPTIONAL)
    if missing or unknown:
        raise MatrixError(f"Variant {entry}: missing keys {missing}, unknown keys {unknown}; "
                          f"keys are {sorted(_REQUIRED | _OPTIONAL)}.")
    if entry["lane"] not in LANES:
        raise MatrixError(f"Variant {entry}: lane must be one of {LANES}, got {entry['lane']!r}.")
    scheme = Scheme.from_dict({key: value for key, value in entry.items() if key != "lane"})
    return MatrixVariant(scheme, entry["lane"])


def search_variants(lane: str, path: str | os.PathLike = MATRIX) -> list[MatrixVariant]:
    """Every variant of ``lane`` in the matrix file, in file order; ids (``Scheme.id``) unique in a lane."""
    if lane not in LANES:
        raise MatrixError(f"lane must be one of {LANES}, got {lane!r}.")
    data = yaml.safe_load(Path(path).read_text()) or {}
    entries = data.get("variants") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise MatrixError(f"{path} must hold a 'variants' list.")
    parsed = [variant_from_entry(e) for e in entries]  # every lane's entries: a typo fails them all
    variants = [v for v in parsed if v.lane == lane]
    ids = [v.id for v in variants]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise MatrixError(f"{path}: variant ids repeat in lane {lane}: {repeated}.")
    return variants


def variant_params(lane: str, path: str | os.PathLike = MATRIX) -> list:
    """The lane's variants as ``pytest.param`` objects for ``@pytest.fixture(params=...)``."""
    return [v.param() for v in search_variants(lane, path)]

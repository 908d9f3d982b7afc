"""What GPUs this process may use, read without starting CUDA, and where ModelOpt's CUDA extensions are cached.

Light on purpose (no torch import): the CLI's ``vlq plan`` and the test lane's xdist worker pinning run
before anything initializes CUDA, and ``CUDA_VISIBLE_DEVICES`` only counts if it is set before then.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML (or nvidia-smi) reports it; ``index`` is the physical index."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int | None = None  # at the time of asking; None where the source does not say

    @property
    def total_gib(self) -> float:
        return self.total_bytes / 2**30


def _all_gpus() -> list[GpuInfo]:
    try:
        import pynvml  # nvidia-ml-py, a dependency of nvidia-modelopt

        pynvml.nvmlInit()
        try:
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(GpuInfo(i, name.decode() if isinstance(name, bytes) else name, int(memory.total), int(memory.free)))
            return gpus
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver: try the CLI, else there is no GPU
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        index, name, total, free = (part.strip() for part in line.split(","))
        gpus.append(GpuInfo(int(index), name, int(float(total)) * 2**20, int(float(free)) * 2**20))
    return gpus


def visible_gpus() -> tuple[GpuInfo, ...]:
    """The GPUs this process may use: all of them, or those ``CUDA_VISIBLE_DEVICES`` names by index."""
    gpus = _all_gpus()
    selection = os.environ.get("CUDA_VISIBLE_DEVICES")
    if selection is None:
        return tuple(gpus)
    by_index = {g.index: g for g in gpus}
    chosen = []
    for part in selection.split(","):
        part = part.strip()
        if not part.lstrip("-").isdigit() or int(part) < 0:
            break  # CUDA stops at the first entry it cannot use; UUIDs count as unknown here
        if int(part) in by_index:
            chosen.append(by_index[int(part)])
    return tuple(chosen)


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of this machine's memory, from /proc/meminfo (0, 0 where unreadable)."""
    fields = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return fields.get("MemTotal", 0), fields.get("MemAvailable", fields.get("MemFree", 0))


def pin_xdist_worker_to_gpu() -> str | None:
    """Under ``pytest -n N``, give worker ``gwK`` the K-th visible GPU (round-robin when N exceeds the GPUs).

    Must run before torch initializes CUDA. Returns the ``CUDA_VISIBLE_DEVICES`` set, or None outside
    a worker or without GPUs.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return None
    gpus = visible_gpus()
    if not gpus:
        return None
    chosen = str(gpus[int(worker[2:]) % len(gpus)].index)
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


def extension_cache_dir() -> Path:
    """Where torch builds ModelOpt's CUDA extensions (``modelopt_cuda_ext_fp8`` & co., ~50 s to build once).

    ``TORCH_EXTENSIONS_DIR`` if set, else ``$VLQ_EXTENSIONS_DIR``, else ``<vlq cache>/torch_extensions``;
    a CI runner caches this folder between nightly runs.
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if os.environ.get("VLQ_EXTENSIONS_DIR"):
        return Path(os.environ["VLQ_EXTENSIONS_DIR"])
    from .cache import default_cache_dir

    return default_cache_dir() / "torch_extensions"


def use_extension_cache() -> Path:
    """Point torch's extension builder at :func:`extension_cache_dir` (before ModelOpt loads a CUDA extension)."""
    path = extension_cache_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    return path


EXTENSION_STAMP = ".vlq-built-for"
#: What installed extension sources are dated to when a kept cache is reused: older than any build.
SOURCES_MTIME = 946684800  # 2000-01-01


def _ninja_recorded_mtimes(folder: Path) -> dict[Path, int]:
    """Each output's mtime (ns) as ninja recorded it in ``.ninja_log`` (v5+: start, end, mtime, output, hash)."""
    log = folder / ".ninja_log"
    recorded: dict[Path, int] = {}
    if not log.is_file():
        return recorded
    for line in log.read_text().splitlines():
        fields = line.split("\t")
        if line.startswith("#") or len(fields) != 5 or not fields[2].isdigit():
            continue
        recorded[folder / fields[3]] = int(fields[2])  # a later entry for the same output wins
    return recorded


def keep_extension_cache(path: str | os.PathLike, built_for: str, sources: Iterable[str | os.PathLike] = ()) -> str:
    """Make a carried extension cache usable after a fresh install of the sources it was built from.

    ninja rebuilds an output when an input is newer than the mtime its log recorded for that output, or when
    the output's own mtime is newer than its dependency record.  A fresh ``pip install`` dates ModelOpt's
    sources to the install, and copying the cache to a new machine re-dates (and truncates) the outputs' mtimes:
    a carried cache was rebuilt on every new machine (56-69 s per extension on an H200; touching the outputs
    made it worse).  With ``built_for`` naming what the objects were built against (ModelOpt and torch
    versions), a cache stamped for the same thing gets each output's mtime back from ``.ninja_log`` and the
    ``sources`` dated to :data:`SOURCES_MTIME` ("kept"); a cache stamped for anything else is emptied so
    torch builds afresh ("cleared"); an unstamped or missing folder is stamped ("stamped").  Source
    *contents* stay guarded by torch, which hashes them into the extension's version.
    """
    import shutil

    root = Path(path)
    stamp = root / EXTENSION_STAMP
    if stamp.is_file() and stamp.read_text().strip() == built_for:
        for folder in [p for p in root.iterdir() if p.is_dir()]:
            for output, mtime_ns in _ninja_recorded_mtimes(folder).items():
                if output.is_file():
                    os.utime(output, ns=(mtime_ns, mtime_ns))
        for source in sources:
            os.utime(source, (SOURCES_MTIME, SOURCES_MTIME))
        return "kept"
    outcome = "stamped"
    if stamp.is_file():
        for entry in root.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        outcome = "cleared"
    root.mkdir(parents=True, exist_ok=True)
    stamp.write_text(built_for + "\n")
    return outcome


def _main(argv: list[str] | None = None) -> int:
    """``python -m vlq.runtime.hardware keep-extension-cache`` for the GPU lane script (after the wheel install)."""
    import argparse
    import importlib.util
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="python -m vlq.runtime.hardware")
    parser.add_argument("action", choices=["keep-extension-cache"])
    parser.parse_args(argv)
    built_for = f"nvidia-modelopt=={version('nvidia-modelopt')} torch=={version('torch')}"
    package = Path(next(iter(importlib.util.find_spec("modelopt").submodule_search_locations)))
    sources = [p for p in (package / "torch" / "kernels").rglob("*") if p.is_file()]  # the extensions' .cu/.cpp/.h
    path = extension_cache_dir()
    outcome = keep_extension_cache(path, built_for, sources)
    print(f"ModelOpt CUDA extension cache {path}: {outcome} ({built_for}; {len(sources)} source files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

"""What a user asks vlq for — model source, calibration data, run folder — checked before any heavy import.

Everything here is light (no torch, transformers, ModelOpt or vLLM), so the CLI refuses a bad path,
format or flag within a fraction of a second, with one line that names the fix.  The run folder's
file names are defined here, once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.errors import CalibrationDataError, CheckpointError, ModelSourceError

TINY = "tiny"
TINY_TRAINED = "tiny-trained"  # the tiny model with learned weights, shipped in vlq/data/tiny_trained
QWEN25_VL_3B_RANDOM = "qwen2.5-vl-3b-random"
# The published Qwen2.5-VL shapes (text and vision config of each size) with random bf16 weights:
# name -> the config file in vlq/data.  For timing and memory; never for fidelity.
RANDOM_SHAPES = {
    QWEN25_VL_3B_RANDOM: "qwen2_5_vl_3b_config.json",
    "qwen2.5-vl-7b-random": "qwen2_5_vl_7b_config.json",
    "qwen2.5-vl-32b-random": "qwen2_5_vl_32b_config.json",
    "qwen2.5-vl-72b-random": "qwen2_5_vl_72b_config.json",
}
NAMED_SOURCES = (TINY, TINY_TRAINED, *RANDOM_SHAPES)
#: What each named model is, said when it loads (a local folder is named by its path).
NAMED_SOURCE_DESCRIPTIONS = {
    TINY: "the tiny synthetic Qwen2.5-VL, random weights: near-flat distributions, fidelity numbers mean little",
    TINY_TRAINED: "the tiny synthetic Qwen2.5-VL with learned weights (vlq/data/tiny_trained): fidelity means something",
    **{name: "a published Qwen2.5-VL shape with random weights: for timing and memory, not fidelity" for name in RANDOM_SHAPES},
}


def describe_source(source: str) -> str:
    """``source`` with what it is, for the loading line."""
    description = NAMED_SOURCE_DESCRIPTIONS.get(str(source))
    return f"{source} ({description})" if description else str(source)
SUPPORTED_MODEL_TYPE = "qwen2_5_vl"
GENERATED_IMAGES = "generated"
DEVICES = ("cpu", "cuda")
#: ``vlq fidelity --point`` names -> the measurement point they record (vlq.fidelity.metrics.MEASUREMENT_POINTS):
#: a the fake-quantized model, b the checkpoint re-read from disk, c vLLM serving the checkpoint.
POINT_NAMES = {"fake": "fake_quant", "fake_quant": "fake_quant", "checkpoint": "checkpoint", "served": "vllm", "vllm": "vllm"}


# ------------------------------------------------------------------------------------------------
# The run folder
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFolder:
    """One run's files: ``manifest.json``, ``search_state.pth`` (+ its settings sidecar),
    ``checkpoint/``, ``log.txt`` (third-party output), and ``sweep.json`` for sweeps.

    While a command writes (:mod:`vlq.runtime.runlock`): ``.vlq.lock`` names the one process writing;
    ``.vlq.staging-PID/`` holds the files it is making until they are committed together
    (``.vlq.commit`` lists them while they are moved in); ``.vlq.pending/`` holds the search state
    of a search not yet committed, kept across interruptions so the same command resumes."""

    root: Path

    MANIFEST = "manifest.json"
    SEARCH_STATE = "search_state.pth"
    CHECKPOINT = "checkpoint"
    LOG = "log.txt"
    SWEEP = "sweep.json"
    RECIPE = "recipe.yaml"  # `vlq recipe RUN`: the ModelOpt AutoQuantize recipe reproducing the search
    LOCK = ".vlq.lock"
    COMMIT = ".vlq.commit"
    STAGING_PREFIX = ".vlq.staging-"
    PENDING = ".vlq.pending"

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def manifest(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def search_state(self) -> Path:
        return self.root / self.SEARCH_STATE

    @property
    def checkpoint(self) -> Path:
        return self.root / self.CHECKPOINT

    @property
    def log(self) -> Path:
        return self.root / self.LOG

    @property
    def recipe(self) -> Path:
        return self.root / self.RECIPE

    @property
    def sweep(self) -> Path:
        return self.root / self.SWEEP

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    @property
    def pending_search_state(self) -> Path:
        """Where a search not yet committed keeps its state (it becomes ``search_state.pth`` when committed)."""
        return self.root / self.PENDING / self.SEARCH_STATE

    def target(self, bits: float) -> "RunFolder":
        """The sub-folder of one effective-bits target of a sweep (``6b/``, ``5.5b/``)."""
        return RunFolder(self.root / f"{bits:g}b")

    def require_writable(self) -> "RunFolder":
        """Refuse a run folder that is a file or sits below a read-only folder."""
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(f"Run folder {self.root} is a file; pass a folder path with --out.")
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise CheckpointError(f"Cannot write the run folder {self.root} ({existing} is not writable); choose another --out.")
        return self


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


def validate_checkpoint_dir(path: Path) -> dict[str, Any]:
    """Check, before any heavy work, that ``path`` is a BF16 Qwen2.5-VL checkpoint folder."""
    if not path.exists():
        raise ModelSourceError(
            f"Model path {path} does not exist. Pass a local Qwen2.5-VL checkpoint folder, "
            f"'{TINY}' for the embedded tiny model, '{TINY_TRAINED}' for it with learned weights, or "
            f"one of {', '.join(RANDOM_SHAPES)} for a published shape with random weights."
        )
    if not path.is_dir():
        raise ModelSourceError(f"Model path {path} is a file; pass the checkpoint folder that holds config.json.")
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelSourceError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint folder. "
            "Point vlq at the folder that holds config.json and the *.safetensors files."
        )
    if not os.access(config_file, os.R_OK):
        raise ModelSourceError(f"{config_file} is not readable; fix its permissions.")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"{config_file} is not valid JSON ({exc}); the checkpoint is broken.") from exc
    except OSError as exc:
        raise ModelSourceError(f"{config_file} cannot be read ({exc.strerror or exc}); fix the checkpoint folder.") from exc
    if not isinstance(config, dict):
        raise ModelSourceError(f"{config_file} must hold a JSON object, got {type(config).__name__}.")
    model_type = config.get("model_type")
    if model_type != SUPPORTED_MODEL_TYPE:
        kind = "a text-only LLM" if "vision_config" not in config else "another vision-language family"
        raise ModelSourceError(
            f"{path} holds model_type={model_type!r} ({kind}); vlq quantizes the language model of "
            f"Qwen2.5-VL (model_type='{SUPPORTED_MODEL_TYPE}', architecture "
            "Qwen2_5_VLForConditionalGeneration). Point it at a Qwen2.5-VL checkpoint."
        )
    if "quantization_config" in config:
        raise ModelSourceError(
            f"{path} is already quantized (config.json has quantization_config: "
            f"{config['quantization_config'].get('quant_method', '?')}); search needs the BF16 original."
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelSourceError(f"{path} has config.json but no *.safetensors weights.")
    return config


def random_shape_config(name: str) -> dict[str, Any]:
    """The published config (text + vision) of a ``qwen2.5-vl-*-random`` shape, as a dict."""
    if name not in RANDOM_SHAPES:
        raise ModelSourceError(f"Unknown shape {name!r}; use one of {', '.join(RANDOM_SHAPES)}.")
    return json.loads((Path(__file__).resolve().parents[1] / "data" / RANDOM_SHAPES[name]).read_text())


def model_config(source: str | os.PathLike) -> dict[str, Any] | None:
    """The config of a model source without loading weights: a checkpoint's config.json, a random
    shape's published config; None for the tiny models (built in code)."""
    if str(source) in RANDOM_SHAPES:
        return random_shape_config(str(source))
    if str(source) in (TINY, TINY_TRAINED):
        return None
    return validate_checkpoint_dir(Path(source).expanduser().resolve())


def resolve_model_source(source: str | os.PathLike) -> str:
    """Check a model source cheaply (no weights read) and return its canonical form."""
    if str(source) in NAMED_SOURCES:
        return str(source)
    path = Path(source).expanduser().resolve()
    validate_checkpoint_dir(path)
    return str(path)


@dataclass(frozen=True)
class ModelRequest:
    """Which model to load and where: a local checkpoint folder, ``tiny`` or ``qwen2.5-vl-3b-random``."""

    source: str = TINY
    device: str = "cpu"
    trust_remote_code: bool = False
    # module prefix -> device when the model is split over several devices (vlq.search.placement); None: all on `device`
    device_map: dict[str, str] | None = None
    offload_folder: str | None = None  # where a device_map's "disk" entries live (accelerate's offload)

    def __post_init__(self):
        object.__setattr__(self, "source", resolve_model_source(self.source))
        if self.device.split(":")[0] not in DEVICES:
            raise ModelSourceError(f"Unknown device {self.device!r}; use cpu or cuda (cuda:N for one GPU).")


# ------------------------------------------------------------------------------------------------
# Calibration data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataRequest:
    """Calibration data: a local text file (``text``), image+text (``images``: ``generated`` or a local
    imagefolder / .jsonl), or — without both — the shipped corpus (synthetic tokens for a model
    without a tokenizer).  ``seed`` picks the generated images."""

    text: str | None = None
    images: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.text is not None:
            path = Path(self.text).expanduser()
            if not path.is_file():
                raise CalibrationDataError(f"Calibration file {path} does not exist; pass a local .txt or .jsonl file with --data.")
            if path.suffix.lower() not in (".txt", ".text", ".jsonl", ".json"):
                raise CalibrationDataError(f"Calibration file {path} must end in .txt, .jsonl or .json, got {path.suffix!r}.")
        if self.images is not None and self.images != GENERATED_IMAGES and not Path(self.images).expanduser().exists():
            raise CalibrationDataError(
                f"Image data {self.images} does not exist; pass --images {GENERATED_IMAGES} or a local imagefolder / .jsonl."
            )

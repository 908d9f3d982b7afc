"""Where a ``--recipe FILE|NAME`` is, found without importing ModelOpt (its import costs seconds).

A NAME is a recipe shipped with the installed ModelOpt: a bare name under ``general/auto_quantize/``
(``nvfp4_fp8_at_5p4bits``) or a path inside the ``modelopt_recipes`` package; anything else is a file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..runtime.errors import SchemeError

#: Where ModelOpt ships its AutoQuantize recipes, inside the ``modelopt_recipes`` package.
SHIPPED_DIR = "general/auto_quantize"
_SUFFIXES = ("", ".yaml", ".yml")


def recipes_root() -> Path | None:
    """The installed ``modelopt_recipes`` folder (None without ModelOpt), found without running its import."""
    spec = importlib.util.find_spec("modelopt_recipes")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_recipe_names() -> tuple[str, ...]:
    """The AutoQuantize recipes the installed ModelOpt ships, by bare name."""
    root = recipes_root()
    if root is None or not (root / SHIPPED_DIR).is_dir():
        return ()
    return tuple(sorted(p.stem for p in (root / SHIPPED_DIR).iterdir() if p.suffix in (".yaml", ".yml")))


def resolve_recipe(text: str) -> Path:
    """The recipe file ``text`` names: a shipped name, a path inside ``modelopt_recipes``, or a file; refused
    (SchemeError naming the shipped ones) when there is none."""
    root = recipes_root()
    candidates = [Path(text + suffix) for suffix in _SUFFIXES]
    if root is not None:
        candidates = [root / SHIPPED_DIR / (text + s) for s in _SUFFIXES] + [root / (text + s) for s in _SUFFIXES] + candidates
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    shipped = shipped_recipe_names()
    if root is None:
        raise SchemeError(f"--recipe {text}: no such file, and no ModelOpt (modelopt_recipes) is installed to ship one.")
    raise SchemeError(f"--recipe {text}: no such file and no recipe of that name ships with ModelOpt; shipped "
                      f"AutoQuantize recipes: {', '.join(shipped) or 'none'}.")

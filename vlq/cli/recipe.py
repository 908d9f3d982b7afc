"""``--recipe FILE|NAME`` on the search commands, and ``vlq recipe RUN``: ModelOpt AutoQuantize recipes in and out.

Light at import: ModelOpt loads only when a recipe is read or written.  A recipe that does not exist is
refused before that (vlq.recipes.names); what the recipe asks for and vlq changes is printed as notes before the
search and recorded in the scheme (so in every manifest and sweep).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ..inputs.requests import RunFolder
from ..runtime.errors import SchemeError, VlqError


def add_recipe_option(parser) -> None:
    """``--recipe``, for every command that searches (or plans a search)."""
    parser.add_argument("--recipe", metavar="FILE|NAME", help="ModelOpt AutoQuantize recipe: a YAML file or a recipe "
                        "shipped with ModelOpt (e.g. w4a8_awq_beta_fp8_at_6p0bits, nvfp4_fp8_at_5p4bits), loaded with "
                        "modelopt.recipe.load_recipe; its formats, bits, method, score size and layer patterns set the "
                        "scheme, other scheme flags override them, vlq's LM-only rules hold on top (the differences "
                        "are printed)")


def recipe_scheme_from_args(args, device: str, *, full_size: bool):
    """The scheme ``--recipe`` asks for on ``device``, other scheme flags on top; its differences printed once."""
    from ..recipes.names import resolve_recipe
    from ..search.scheme import SCHEME_FIELDS, default_scheme

    if getattr(args, "scheme", None):
        raise SchemeError("--recipe and --scheme both give the search's scheme; pass one of them.")
    resolve_recipe(args.recipe)  # a missing recipe is refused before ModelOpt is imported
    recipe = getattr(args, "_loaded_recipe", None)
    if recipe is None:
        from ..recipes.reading import read_recipe

        recipe = args._loaded_recipe = read_recipe(args.recipe)
    from ..recipes.reading import recipe_scheme

    flags = {key: getattr(args, key) for key in SCHEME_FIELDS
             if getattr(args, key, None) is not None and getattr(args, key) != "auto"}
    scheme = recipe_scheme(recipe, default_scheme(device, full_size=full_size), flags,
                           images=getattr(args, "images", None) is not None)
    targets = getattr(args, "targets", None)
    if targets:  # a sweep decides its own targets from the one search
        scheme = replace(scheme, recipe=replace(scheme.recipe, differences=scheme.recipe.differences + (
            f"--targets {targets} replace the recipe's effective_bits {recipe.target_bits:g}",)))
    shown = args.__dict__.setdefault("_recipe_notes_shown", set())
    for line in scheme.recipe.differences:
        if line not in shown:
            shown.add(line)
            print(f"vlq: note: recipe {args.recipe}: {line}", file=sys.stderr, flush=True)
    return scheme


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("recipe", help="write the ModelOpt AutoQuantize recipe that reproduces a run's search "
                              "(loads with modelopt.recipe.load_recipe; hf_ptq --recipe or vlq search --recipe run it)")
    p.add_argument("run_dir", help="run folder with a manifest.json (vlq run / search / sweep target)")
    p.add_argument("--out", help=f"recipe file to write (default RUN/{RunFolder.RECIPE})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder = RunFolder(args.run_dir)
    if not folder.manifest.exists():
        raise VlqError(f"{folder.root} has no {RunFolder.MANIFEST}; pass a folder written by `vlq run` or `vlq search --out FOLDER`.")
    out = Path(args.out) if args.out else folder.recipe
    if out.suffix not in (".yaml", ".yml"):
        raise VlqError(f"--out {out}: a recipe is a .yaml file (ModelOpt's loader finds it by that suffix).")
    if not out.parent.is_dir():
        raise VlqError(f"--out {out}: folder {out.parent} does not exist.")
    from ..manifest.manifest import Manifest
    from ..recipes.writing import recipe_yaml
    from ..runtime.files import atomic_write_text

    from ..recipes.reading import quiet_modelopt

    with quiet_modelopt():
        text = recipe_yaml(Manifest.load(folder.manifest))
    atomic_write_text(out, text)
    print(text)
    print(f"recipe written to {out} (check: python -c \"from modelopt.recipe import load_recipe; load_recipe('{out}')\")")
    return 0

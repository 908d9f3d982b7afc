"""Text-only versus image+text calibration: does the search decide differently when it sees images?

The language model of Qwen2.5-VL reads visual tokens in deployment, but text-only calibration never
shows it any.  :func:`compare_calibration_manifests` takes two manifests of the same model, formats, target
and method — one searched on text, one on image+text — and reports

* per-group decision agreement (same chosen format, fraction of groups);
* rank correlation (Spearman, average ranks for ties) of the sensitivity scores, over every
  (group, quantized format) pair and per format;
* which layers move: groups whose decision changed, and the largest shifts in sensitivity rank.

A group's *sensitivity* is its score for the most aggressive candidate format (lowest effective
bits): that is the choice the bit budget presses on.  Scores of the two runs are on different
scales (different losses), which is why only ranks are compared.

:func:`compare_method_manifests` does the same for two searches that differ in their sensitivity method
(``gradient`` vs ``kl_div``) on one calibration set.  Beside the decisions, both comparisons report
what each resulting scheme does to the model's outputs (:class:`FidelityPair`): KL(BF16 || Q) mean
and p99 and the same-top-token rate on held-out text and image+text, read from each manifest's
fidelity block at point a (the fake-quantized model right after the search) and paired only when
both sides were measured on the same held-out data.

:func:`vlq.pipeline.compare_calibration` and :func:`vlq.pipeline.compare_methods` run both searches
on private copies of one loaded model (every guard checked), measure each scheme against one BF16
reference, and call these functions.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import ManifestMismatch, SchemeError
from .metrics import DATA_KINDS, FidelityMetrics
from ..manifest.manifest import Manifest
from ..formats.registry import FORMATS, NO_QUANT

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


# ------------------------------------------------------------------------------------------------
# Rank statistics (numpy only; scipy is optional and not used)
# ------------------------------------------------------------------------------------------------


def average_ranks(values) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing their average rank (scipy's ``rankdata(method='average')``)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float | None:
    """Spearman's rank correlation of ``a`` and ``b``; ``None`` when undefined (n < 2 or a constant side)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equal lengths, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    if denom == 0.0:
        return None
    return float((ra * rb).sum() / denom)


# ------------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupComparison:
    """One decision group under both calibrations."""

    name: str
    layer: int | None
    label: str  # member leaf names, e.g. q_proj+k_proj+v_proj
    text_chosen: str
    image_text_chosen: str
    text_scores: tuple[tuple[str, float], ...]  # (format, score) for every quantized candidate
    image_text_scores: tuple[tuple[str, float], ...]
    text_rank: float  # sensitivity rank among all groups, 1 = least sensitive
    image_text_rank: float

    @property
    def agrees(self) -> bool:
        return self.text_chosen == self.image_text_chosen

    @property
    def rank_shift(self) -> float:
        """Positive: more sensitive under image+text calibration."""
        return self.image_text_rank - self.text_rank


@dataclass(frozen=True)
class CalibrationComparison:
    """Text-only versus image+text search on the same model, formats, target and method."""

    model_source: str
    scheme_id: str
    formats: tuple[str, ...]  # quantized candidate formats
    sensitivity_format: str  # the format whose score is a group's sensitivity
    target_bits: float
    text_source: str
    image_text_source: str
    text_bits: float
    image_text_bits: float
    groups: tuple[GroupComparison, ...]
    spearman: float | None  # over every (group, quantized format) pair
    spearman_by_format: tuple[tuple[str, float | None], ...]
    #: each side's KLD to BF16 on held-out text and image+text (a: text-only, b: image+text calibration)
    fidelity: tuple["FidelityPair", ...] = ()

    # -- views ---------------------------------------------------------------------------------
    @property
    def n_agree(self) -> int:
        return sum(g.agrees for g in self.groups)

    @property
    def agreement(self) -> float:
        return self.n_agree / len(self.groups) if self.groups else 1.0

    @property
    def moved(self) -> tuple[GroupComparison, ...]:
        """Groups whose chosen format differs between the two calibrations."""
        return tuple(g for g in self.groups if not g.agrees)

    def largest_rank_shifts(self, n: int = 5) -> tuple[GroupComparison, ...]:
        return tuple(sorted(self.groups, key=lambda g: (-abs(g.rank_shift), g.name))[:n])

    def moved_layers(self) -> tuple[int, ...]:
        return tuple(sorted({g.layer for g in self.moved if g.layer is not None}))

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["agreement"] = self.agreement
        data["n_agree"] = self.n_agree
        data["moved"] = [g.name for g in self.moved]
        data["moved_layers"] = list(self.moved_layers())
        data["kind"] = "calibration"
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CalibrationComparison":
        def pairs(items):
            return tuple((str(f), float(s)) for f, s in items)

        groups = tuple(GroupComparison(
            name=g["name"], layer=g["layer"], label=g["label"], text_chosen=g["text_chosen"],
            image_text_chosen=g["image_text_chosen"], text_scores=pairs(g["text_scores"]),
            image_text_scores=pairs(g["image_text_scores"]), text_rank=float(g["text_rank"]),
            image_text_rank=float(g["image_text_rank"])) for g in data["groups"])
        return cls(
            model_source=data["model_source"], scheme_id=data["scheme_id"], formats=tuple(data["formats"]),
            sensitivity_format=data["sensitivity_format"], target_bits=float(data["target_bits"]),
            text_source=data["text_source"], image_text_source=data["image_text_source"], text_bits=float(data["text_bits"]),
            image_text_bits=float(data["image_text_bits"]), groups=groups, spearman=data["spearman"],
            spearman_by_format=tuple((f, v) for f, v in data["spearman_by_format"]),
            fidelity=tuple(FidelityPair.from_dict(p) for p in data.get("fidelity", ())),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    # -- report --------------------------------------------------------------------------------
    def summary_rows(self) -> list[list[str]]:
        def rho(v):
            return "undefined" if v is None else f"{v:.3f}"

        rows = [
            ["model", self.model_source],
            ["scheme", self.scheme_id],
            ["text-only calibration", self.text_source],
            ["image+text calibration", self.image_text_source],
            ["LM effective bits (text / image+text)", f"{self.text_bits:.3f} / {self.image_text_bits:.3f} (target {self.target_bits:g})"],
            ["decision agreement", f"{self.n_agree}/{len(self.groups)} groups ({self.agreement:.1%})"],
            ["Spearman rho, all (group, format) scores", rho(self.spearman)],
        ]
        rows += [[f"Spearman rho, {fmt} scores", rho(v)] for fmt, v in self.spearman_by_format]
        rows.append(["layers whose decisions move", ", ".join(map(str, self.moved_layers())) or "none"])
        return rows

    def markdown(self, *, plot_path: str | None = None, top: int = 8, fmt: str = "github") -> str:
        from tabulate import tabulate

        parts = ["## Text-only vs image+text calibration", "", tabulate(self.summary_rows(), headers=["", ""], tablefmt=fmt), ""]
        parts += _fidelity_markdown(self.fidelity, ("text-only", "image+text"), fmt)
        if self.moved:
            parts += [
                "### Groups whose decision moves", "",
                tabulate(
                    [[g.name, g.text_chosen, g.image_text_chosen, f"{g.text_rank:g}", f"{g.image_text_rank:g}"] for g in self.moved],
                    headers=["group", "text-only", "image+text", "text rank", "image+text rank"], tablefmt=fmt,
                ),
                "",
            ]
        else:
            parts += ["Every group gets the same format under both calibrations.", ""]
        parts += [
            f"### Largest shifts in {self.sensitivity_format} sensitivity rank (1 = least sensitive)", "",
            tabulate(
                [[g.name, f"{g.text_rank:g}", f"{g.image_text_rank:g}", f"{g.rank_shift:+g}", "yes" if g.agrees else "no"]
                 for g in self.largest_rank_shifts(top)],
                headers=["group", "text rank", "image+text rank", "shift", "same decision"], tablefmt=fmt,
            ),
            "",
        ]
        if plot_path:
            parts += [f"![text-only vs image+text sensitivity scores]({plot_path})", ""]
        return "\n".join(parts)

    def plot(self, path: str | os.PathLike) -> Path:
        """Scatter of text-only vs image+text scores per (group, format), colored by decision agreement."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110)
        markers = "osD^v<>"
        positive = [s for g in self.groups for _, s in g.text_scores + g.image_text_scores if s > 0]
        floor = min(positive) / 10 if positive else 1e-12
        for k, fmt in enumerate(self.formats):
            for agrees, color, label in ((True, "tab:green", "same decision"), (False, "tab:red", "decision moves")):
                xs, ys = [], []
                for g in self.groups:
                    if g.agrees != agrees:
                        continue
                    xs.append(max(dict(g.text_scores)[fmt], floor))
                    ys.append(max(dict(g.image_text_scores)[fmt], floor))
                if xs:
                    ax.scatter(xs, ys, c=color, marker=markers[k % len(markers)], alpha=0.8, edgecolors="none",
                               label=f"{fmt}: {label} ({len(xs)})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("text-only sensitivity score")
        ax.set_ylabel("image+text sensitivity score")
        rho = "undefined" if self.spearman is None else f"{self.spearman:.3f}"
        ax.set_title(f"{self.scheme_id}\nagreement {self.agreement:.0%}, Spearman rho {rho}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        ax.grid(True, which="both", alpha=0.2)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """``comparison.json``, ``comparison.png`` and ``comparison.md`` (which embeds the plot) in ``out_dir``."""
        from ..runtime.files import atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        png = self.plot(out / "comparison.png")
        js = atomic_write_text(out / "comparison.json", self.to_json())
        md = atomic_write_text(out / "comparison.md", self.markdown(plot_path=png.name) + "\n")
        return {"json": js, "plot": png, "markdown": md}


def _label(members: tuple[str, ...]) -> str:
    return "+".join(m.rsplit(".", 1)[-1] for m in members)


def _scores(group, formats: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    by_format = {c.format: c.score for c in group.candidates}
    return tuple((f, float(by_format[f])) for f in formats)


def compare_calibration_manifests(text: Manifest, image_text: Manifest) -> CalibrationComparison:
    """Compare two manifests of one model, formats, target and method, calibrated differently.

    Refuses manifests of different models or schemes (the comparison would mean nothing) and
    manifests whose decision groups differ.  Deterministic: the same manifests give an equal result.
    """
    problems = []
    if text.model_source != image_text.model_source:
        problems.append(f"model {text.model_source!r} != {image_text.model_source!r}")
    for field in ("formats", "target_bits", "method"):
        a, b = getattr(text.scheme, field), getattr(image_text.scheme, field)
        if a != b:
            problems.append(f"{field} {a!r} != {b!r}")
    if problems:
        raise SchemeError("Text-only and image+text searches must share model and budget to be compared: " + "; ".join(problems) + ".")
    text_groups = {g.name: g for g in text.groups}
    image_groups = {g.name: g for g in image_text.groups}
    if set(text_groups) != set(image_groups):
        only_text = sorted(set(text_groups) - set(image_groups))
        only_image = sorted(set(image_groups) - set(text_groups))
        raise ManifestMismatch(f"The two manifests decide different groups (only text-only: {only_text[:3]}, only image+text: {only_image[:3]}).")
    formats = tuple(f for f in text.scheme.formats if f != NO_QUANT)
    sensitivity_format = min(formats, key=lambda f: (FORMATS[f].bits if f in FORMATS else 16.0, f))
    names = [g.name for g in text.groups]  # manifest order: layer by layer
    for name in names:
        if text_groups[name].members != image_groups[name].members:
            raise ManifestMismatch(f"group {name} has members {text_groups[name].members} vs {image_groups[name].members}.")
    text_sens = [dict(_scores(text_groups[n], formats))[sensitivity_format] for n in names]
    image_sens = [dict(_scores(image_groups[n], formats))[sensitivity_format] for n in names]
    text_ranks, image_ranks = average_ranks(text_sens), average_ranks(image_sens)
    groups = []
    for i, name in enumerate(names):
        t, v = text_groups[name], image_groups[name]
        match = _LAYER_RE.search(name + ".")
        groups.append(GroupComparison(
            name=name,
            layer=int(match.group(1)) if match else None,
            label=_label(t.members),
            text_chosen=t.chosen,
            image_text_chosen=v.chosen,
            text_scores=_scores(t, formats),
            image_text_scores=_scores(v, formats),
            text_rank=float(text_ranks[i]),
            image_text_rank=float(image_ranks[i]),
        ))
    all_text = [s for g in groups for _, s in g.text_scores]
    all_image = [s for g in groups for _, s in g.image_text_scores]
    by_format = tuple(
        (f, spearman([dict(g.text_scores)[f] for g in groups], [dict(g.image_text_scores)[f] for g in groups]))
        for f in formats
    )
    return CalibrationComparison(
        model_source=text.model_source,
        scheme_id=text.scheme.id,
        formats=formats,
        sensitivity_format=sensitivity_format,
        target_bits=float(text.scheme.target_bits),
        text_source=text.calibration_source,
        image_text_source=image_text.calibration_source,
        text_bits=float(text.achieved_bits),
        image_text_bits=float(image_text.achieved_bits),
        groups=tuple(groups),
        spearman=spearman(all_text, all_image),
        spearman_by_format=by_format,
        fidelity=fidelity_pairs(text, image_text),
    )


# ------------------------------------------------------------------------------------------------
# Fidelity beside the decisions (issue 11): what each side's scheme does to the model's outputs
# ------------------------------------------------------------------------------------------------

#: The measurement point comparisons read from each manifest's fidelity block: the fake-quantized model
#: right after the search (``vlq.pipeline.measure_fake_quant``), the point every scheme has.
COMPARED_POINT = "fake_quant"


@dataclass(frozen=True)
class FidelityPair:
    """One held-out data kind, measured for both compared schemes at the same point on the same data."""

    data_kind: str
    measurement_point: str
    a: FidelityMetrics
    b: FidelityMetrics

    def __post_init__(self):
        for side in (self.a, self.b):
            if (side.data_kind, side.measurement_point) != (self.data_kind, self.measurement_point):
                raise ValueError(f"A fidelity pair for {self.data_kind}/{self.measurement_point} got {side.data_kind}/"
                                 f"{side.measurement_point} metrics.")
        if (self.a.data_source, self.a.tokens) != (self.b.data_source, self.b.tokens):
            raise ValueError(f"The two sides were measured on different held-out data ({self.a.data_source}, {self.a.tokens} "
                             f"tokens vs {self.b.data_source}, {self.b.tokens}); their KLD cannot be compared.")

    @property
    def kld_mean_ratio(self) -> float | None:
        """Mean KLD of side b over side a; None when a's is 0 (nothing quantized)."""
        return self.b.kld_mean / self.a.kld_mean if self.a.kld_mean > 0 else None

    @classmethod
    def from_dict(cls, data: dict) -> "FidelityPair":
        return cls(data["data_kind"], data["measurement_point"], FidelityMetrics.from_dict(data["a"]),
                   FidelityMetrics.from_dict(data["b"]))


def fidelity_pairs(a: Manifest, b: Manifest, point: str = COMPARED_POINT) -> tuple[FidelityPair, ...]:
    """The data kinds both manifests measured at ``point`` on the same held-out data (text first).

    A kind measured by one side only, or on different held-out data, gives no pair: its KLDs would
    not be comparable.
    """
    def at(manifest: Manifest, kind: str) -> FidelityMetrics | None:
        return next((m for m in manifest.fidelity if m.data_kind == kind and m.measurement_point == point), None)

    pairs = []
    for kind in DATA_KINDS:
        ma, mb = at(a, kind), at(b, kind)
        if ma is not None and mb is not None and (ma.data_source, ma.tokens) == (mb.data_source, mb.tokens):
            pairs.append(FidelityPair(kind, point, ma, mb))
    return tuple(pairs)


def fidelity_pair_rows(pairs: tuple[FidelityPair, ...], labels: tuple[str, str]) -> tuple[list[str], list[list[str]]]:
    """Headers and one row per held-out data kind: mean KLD, p99 KLD and same-top rate of both sides."""
    a, b = labels
    headers = ["held-out data", "tokens", f"mean KLD {a}", f"mean KLD {b}", f"{b} / {a}", f"p99 KLD {a}", f"p99 KLD {b}",
               f"same top {a}", f"same top {b}"]
    rows = []
    for p in pairs:
        ratio = p.kld_mean_ratio
        rows.append([p.data_kind.replace("image_text", "image+text"), str(p.a.tokens), f"{p.a.kld_mean:.6f}", f"{p.b.kld_mean:.6f}",
                     "-" if ratio is None else f"{ratio:.3f}", f"{p.a.kld_p99:.6f}", f"{p.b.kld_p99:.6f}",
                     f"{100 * p.a.same_top_rate:.2f}%", f"{100 * p.b.same_top_rate:.2f}%"])
    return headers, rows


def _fidelity_markdown(pairs: tuple[FidelityPair, ...], labels: tuple[str, str], fmt: str) -> list[str]:
    from tabulate import tabulate

    title = ("### Fidelity to BF16 of each scheme (point a: the fake-quantized model right after the search; "
             "KLD in nats per token on held-out data disjoint from calibration)")
    if not pairs:
        return [title, "", "Not measured: the manifests carry no fidelity block measured on the same held-out data.", ""]
    headers, rows = fidelity_pair_rows(pairs, labels)
    sources = "; ".join(f"{p.data_kind}: {p.a.data_source}" for p in pairs)
    return [title, "", tabulate(rows, headers=headers, tablefmt=fmt), "", f"held-out data: {sources}", ""]


def _same_search_problems(a: Manifest, b: Manifest, fields_: tuple[str, ...]) -> list[str]:
    problems = []
    if a.model_source != b.model_source:
        problems.append(f"model {a.model_source!r} != {b.model_source!r}")
    for field in fields_:
        x, y = getattr(a.scheme, field), getattr(b.scheme, field)
        if x != y:
            problems.append(f"{field} {x!r} != {y!r}")
    if {g.name: g.members for g in a.groups} != {g.name: g.members for g in b.groups}:
        problems.append("the decision groups differ")
    return problems


# ------------------------------------------------------------------------------------------------
# Method comparison: gradient vs kl_div sensitivity on the same model, formats, bits and data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodComparison:
    """Two searches that differ only in their sensitivity method (``gradient`` vs ``kl_div``).

    ``decisions`` holds (group, chosen under a, chosen under b) in manifest order; ``spearman`` is the
    rank correlation of the two methods' scores over every (group, quantized format) pair (the two
    methods score on different scales, so only ranks compare); ``fidelity`` is each resulting scheme's
    KLD to BF16 on held-out text and image+text (:data:`COMPARED_POINT`).
    """

    model_source: str
    formats: tuple[str, ...]
    target_bits: float
    calibration_source: str
    methods: tuple[str, str]
    scheme_ids: tuple[str, str]
    achieved_bits: tuple[float, float]
    decisions: tuple[tuple[str, str, str], ...]
    spearman: float | None
    fidelity: tuple[FidelityPair, ...] = ()

    @property
    def labels(self) -> tuple[str, str]:
        a, b = self.methods
        return (a, b) if a != b else (f"{a} (1)", f"{b} (2)")

    @property
    def n_agree(self) -> int:
        return sum(x == y for _, x, y in self.decisions)

    @property
    def agreement(self) -> float:
        return self.n_agree / len(self.decisions) if self.decisions else 1.0

    @property
    def moved(self) -> tuple[tuple[str, str, str], ...]:
        return tuple(d for d in self.decisions if d[1] != d[2])

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(kind="method", agreement=self.agreement, n_agree=self.n_agree)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "MethodComparison":
        return cls(
            model_source=data["model_source"], formats=tuple(data["formats"]), target_bits=float(data["target_bits"]),
            calibration_source=data["calibration_source"], methods=tuple(data["methods"]), scheme_ids=tuple(data["scheme_ids"]),
            achieved_bits=tuple(float(b) for b in data["achieved_bits"]), decisions=tuple(tuple(d) for d in data["decisions"]),
            spearman=data["spearman"], fidelity=tuple(FidelityPair.from_dict(p) for p in data.get("fidelity", ())),
        )

    def markdown(self, *, fmt: str = "github") -> str:
        from tabulate import tabulate

        a, b = self.labels
        rho = "undefined" if self.spearman is None else f"{self.spearman:.3f}"
        rows = [
            ["model", self.model_source],
            ["schemes", f"{self.scheme_ids[0]} vs {self.scheme_ids[1]}"],
            ["calibration (both)", self.calibration_source],
            ["LM effective bits", f"{self.achieved_bits[0]:.3f} ({a}) / {self.achieved_bits[1]:.3f} ({b}) (target {self.target_bits:g})"],
            ["decision agreement", f"{self.n_agree}/{len(self.decisions)} groups ({self.agreement:.1%})"],
            ["Spearman rho of the two methods' scores", rho],
        ]
        parts = [f"## Sensitivity method: {a} vs {b}", "", tabulate(rows, headers=["", ""], tablefmt=fmt), ""]
        parts += _fidelity_markdown(self.fidelity, (a, b), fmt)
        if self.moved:
            parts += ["### Groups whose decision moves", "",
                      tabulate([list(d) for d in self.moved], headers=["group", a, b], tablefmt=fmt), ""]
        else:
            parts += ["Every group gets the same format under both methods.", ""]
        return "\n".join(parts)

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """``comparison.json`` and ``comparison.md`` in ``out_dir``."""
        from ..runtime.files import atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return {"json": atomic_write_text(out / "comparison.json", self.to_json()),
                "markdown": atomic_write_text(out / "comparison.md", self.markdown() + "\n")}


def compare_method_manifests(a: Manifest, b: Manifest) -> MethodComparison:
    """Compare two searches of one model, formats, target and calibration data whose methods differ
    (or not: a search compared with itself agrees everywhere and measures the same KLD)."""
    problems = _same_search_problems(a, b, ("formats", "target_bits"))
    if a.calibration_source != b.calibration_source:
        problems.append(f"calibration {a.calibration_source!r} != {b.calibration_source!r}")
    if problems:
        raise SchemeError("Two searches must share model, formats, target and calibration data to compare their methods: "
                          + "; ".join(problems) + ".")
    formats = tuple(f for f in a.scheme.formats if f != NO_QUANT)
    b_groups = {g.name: g for g in b.groups}
    decisions = tuple((g.name, g.chosen, b_groups[g.name].chosen) for g in a.groups)
    scores_a = [s for g in a.groups for _, s in _scores(g, formats)]
    scores_b = [s for g in a.groups for _, s in _scores(b_groups[g.name], formats)]
    return MethodComparison(
        model_source=a.model_source, formats=formats, target_bits=float(a.scheme.target_bits),
        calibration_source=a.calibration_source, methods=(a.scheme.method, b.scheme.method), scheme_ids=(a.scheme.id, b.scheme.id),
        achieved_bits=(float(a.achieved_bits), float(b.achieved_bits)), decisions=decisions,
        spearman=spearman(scores_a, scores_b), fidelity=fidelity_pairs(a, b),
    )


def load_comparison(path: str | os.PathLike) -> "CalibrationComparison | MethodComparison":
    """A saved ``comparison.json`` of either kind (``vlq report --comparisons``)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("kind", "calibration") not in ("calibration", "method"):
        raise SchemeError(f"{path} is not a comparison.json written by `vlq compare-calibration` or `vlq compare-methods`.")
    return MethodComparison.from_dict(data) if data.get("kind") == "method" else CalibrationComparison.from_dict(data)

"""Issue 7: LM-only search calibrated and scored on image+text, and its comparison with text-only.

CPU lane: the tiny model, processor-built batches of generated images, real ModelOpt/transformers.
Image+text variants search FP8-vs-BF16 per group at 12 bits (a real choice, and fast on 2 cores)
for both methods and both strategies.  ``-m gpu``: the 3B architecture with processor-less batches.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import SearchedExport

from vlq.data.calibration import (
    IGNORE_INDEX, CalibrationSet, image_text_batches, load_image_text_samples, synthetic_image_text_batches, text_batches,
)
from vlq import pipeline
from vlq.fidelity.comparison import CalibrationComparison, compare_calibration_manifests, spearman
from vlq.runtime.errors import CalibrationDataError, SchemeError
from vlq.manifest.manifest import Manifest
from vlq.data.models import fingerprint_parameters
from vlq.pipeline import fresh_copy
from vlq.search.scheme import Scheme
from vlq.search.guards import LmHeadGuard, VisionGuard
from vlq.search.forward import make_forward_step

SEQ_LEN = 64
SEED = 0


def _scheme(method: str, strategy: str, **kw) -> Scheme:
    fields = dict(formats=("fp8",), target_bits=12.0, method=method, strategy=strategy,
                  num_calib_steps=2, num_score_steps=1, seq_len=SEQ_LEN)
    fields.update(kw)
    return Scheme(**fields)


VARIANTS = [_scheme(m, s) for m in ("gradient", "kl_div") for s in ("extract", "mask")]


@pytest.fixture(scope="module")
def image_calibration(pristine_vlm) -> CalibrationSet:
    return image_text_batches(pristine_vlm.processor, num_batches=2, seq_len=SEQ_LEN, seed=SEED, vocab_size=pristine_vlm.vocab_size)


@pytest.fixture(scope="module")
def text_calibration(pristine_vlm) -> CalibrationSet:
    return text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=2, seq_len=SEQ_LEN)


# ---- batches ------------------------------------------------------------------------------------


def test_processor_built_batches_carry_images_and_text_only_labels(pristine_vlm, image_calibration):
    config = pristine_vlm.config
    assert image_calibration.kind == "image_text" and image_calibration.source.startswith("image_text:generated")
    merge = config.vision_config.spatial_merge_size
    for batch in image_calibration:
        ids, labels = batch["input_ids"], batch["labels"]
        assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
        assert ids.shape == (1, SEQ_LEN)
        image = ids == config.image_token_id
        n_tokens = int(batch["image_grid_thw"].prod(-1).sum()) // merge**2
        assert int(image.sum()) == n_tokens > 0
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
        assert torch.equal(batch["mm_token_type_ids"].bool(), image)
        assert (ids == config.vision_start_token_id).sum() == 1 and (ids == config.vision_end_token_id).sum() == 1
        assert (labels[image] == IGNORE_INDEX).all() and (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
        text = (~image) & (batch["attention_mask"] == 1)
        assert torch.equal(labels[text], ids[text])


def test_generated_batches_are_deterministic_per_seed(pristine_vlm, image_calibration):
    again = image_text_batches(pristine_vlm.processor, num_batches=2, seq_len=SEQ_LEN, seed=SEED, vocab_size=pristine_vlm.vocab_size)
    other = image_text_batches(pristine_vlm.processor, num_batches=2, seq_len=SEQ_LEN, seed=SEED + 1, vocab_size=pristine_vlm.vocab_size)
    for a, b in zip(image_calibration, again):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a["pixel_values"], b["pixel_values"]) if a["pixel_values"].shape == b["pixel_values"].shape else True
               for a, b in zip(image_calibration, other))


def test_sample_longer_than_seq_len_is_refused(pristine_vlm):
    with pytest.raises(CalibrationDataError, match="raise seq_len"):
        image_text_batches(pristine_vlm.processor, num_batches=1, seq_len=8, vocab_size=pristine_vlm.vocab_size)


def _write_images(folder: Path, n: int) -> list[str]:
    from vlq.data.calibration import generated_image_text_samples

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, sample in enumerate(generated_image_text_samples(n, seed=7)):
        name = f"img{i}.png"
        sample["image"].save(folder / name)
        names.append(name)
    return names


def test_local_imagefolder_and_jsonl_load_through_datasets(pristine_vlm, tmp_path):
    folder = tmp_path / "imagefolder"
    names = _write_images(folder, 2)
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": n, "caption": f"A picture number {i}."}) + "\n" for i, n in enumerate(names)))
    samples = load_image_text_samples(folder)
    assert sorted(s["text"] for s in samples) == ["A picture number 0.", "A picture number 1."]
    batches = image_text_batches(pristine_vlm.processor, num_batches=1, batch_size=2, path=folder, vocab_size=pristine_vlm.vocab_size)
    assert batches.batches[0]["input_ids"].shape[0] == 2 and batches.source == f"image_text:{folder}"

    lines = tmp_path / "vqa.jsonl"
    lines.write_text("".join(json.dumps({"image": f"imagefolder/{n}", "question": "What is shown?", "answer": "A shape."}) + "\n" for n in names))
    samples = load_image_text_samples(lines)
    assert [s["answer"] for s in samples] == ["A shape.", "A shape."] and samples[0]["image"].size[0] > 0
    assert len(image_text_batches(pristine_vlm.processor, num_batches=2, path=lines, vocab_size=pristine_vlm.vocab_size)) == 2

    (tmp_path / "broken.jsonl").write_text(json.dumps({"image": "missing.png", "text": "x"}) + "\n")
    with pytest.raises(CalibrationDataError, match="do not exist"):
        load_image_text_samples(tmp_path / "broken.jsonl")
    with pytest.raises(CalibrationDataError, match="only 2|holds 2 image samples"):
        image_text_batches(pristine_vlm.processor, num_batches=3, path=lines)


# ---- the extract strategy's forward equals the VLM's ------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2])
def test_extract_forward_equals_vlm_forward(pristine_vlm, batch_size):
    """inputs_embeds (BF16 vision features scattered into the image pads) + mrope positions, through
    the extracted text model and the parent's lm_head, give the full VLM forward's logits."""
    calibration = image_text_batches(pristine_vlm.processor, num_batches=1, batch_size=batch_size, seq_len=None,
                                     seed=3, vocab_size=pristine_vlm.vocab_size)
    batch = calibration.batches[0]
    if batch_size == 2:
        assert (batch["attention_mask"] == 0).any(), "want a padded row in the batch"
    with torch.no_grad():
        extract = make_forward_step(pristine_vlm, "extract")(pristine_vlm.language_model, batch)
        full = make_forward_step(pristine_vlm, "mask")(pristine_vlm.vlm, batch)
        text_only = make_forward_step(pristine_vlm, "extract")(
            pristine_vlm.language_model, {k: batch[k] for k in ("input_ids", "attention_mask")})
    torch.testing.assert_close(extract, full)
    keep = batch["attention_mask"].bool()
    assert not torch.allclose(extract[keep].float(), text_only[keep].float()), "the images changed nothing"


def test_text_only_extract_forward_is_unchanged(pristine_vlm, text_calibration):
    batch = text_calibration.batches[0]
    with torch.no_grad():
        got = make_forward_step(pristine_vlm, "extract")(pristine_vlm.language_model, batch)
        want = pristine_vlm.lm_head(pristine_vlm.language_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_processorless_batches_match_the_model(pristine_vlm):
    """The batches the 3B gpu test uses, checked on the tiny model: both forwards agree."""
    calibration = synthetic_image_text_batches(pristine_vlm.config, vocab_size=pristine_vlm.vocab_size, num_batches=1,
                                               batch_size=2, seq_len=40, image_grid=(1, 4, 6))
    batch = calibration.batches[0]
    assert int((batch["input_ids"] == pristine_vlm.config.image_token_id).sum()) == 2 * 6
    with torch.no_grad():
        torch.testing.assert_close(
            make_forward_step(pristine_vlm, "extract")(pristine_vlm.language_model, batch),
            make_forward_step(pristine_vlm, "mask")(pristine_vlm.vlm, batch))


# ---- image+text searches, both methods and strategies ---------------------------------------------


@dataclass(frozen=True)
class ImageSearched(SearchedExport):
    vision_grads: tuple[str, ...]  # vision parameters that kept a gradient after the search


@pytest.fixture(scope="module")
def image_searches(pristine_vlm, image_calibration, tmp_path_factory):
    """Each variant searched and exported once through the pipeline, on demand, and kept for the module's tests."""
    cache: dict[str, ImageSearched] = {}

    def get(scheme: Scheme) -> ImageSearched:
        if scheme.id not in cache:
            searched = pipeline.search(fresh_copy(pristine_vlm), scheme, image_calibration)
            tower = searched.loaded.vlm.get_submodule(searched.loaded.vision.root)
            grads = tuple(n for n, p in tower.named_parameters() if p.grad is not None)
            exported = pipeline.export(searched, tmp_path_factory.mktemp(scheme.id) / "checkpoint")
            cache[scheme.id] = ImageSearched(searched, exported, grads)
        return cache[scheme.id]

    return get


@pytest.fixture(params=VARIANTS, ids=lambda s: s.id)
def image_searched(request, image_searches) -> ImageSearched:
    return image_searches(request.param)


def test_image_text_search_keeps_vision_and_lm_head_unquantized(image_searched):
    result = image_searched.result
    vision = VisionGuard(result.loaded).check(result)
    assert vision.ok, vision.problems  # no quantizer, no decision, weights byte-identical, dtypes unchanged
    assert vision.checked == len(result.loaded.vision.linear_names) > 0
    head = LmHeadGuard(result.loaded).check(result)
    assert head.ok, head.problems
    assert not image_searched.vision_grads, f"the vision tower kept gradients: {image_searched.vision_grads[:3]}"
    assert result.calibration_source.startswith("image_text:")


def test_image_text_manifest_verifies(image_searched):
    manifest = image_searched.manifest
    manifest.verify(state=image_searched.result.modelopt_state).require()
    live = [c for c in image_searched.searched.checks if c.key == "manifest_vs_search"]
    assert len(live) == 1 and live[0].ok, live  # checked by the pipeline before the export rewrote the weights
    manifest.verify(checkpoint=image_searched.exported.path).require()
    report = image_searched.exported.export.report
    assert report.check.ok, report.check.problems
    assert manifest.calibration_source.startswith("image_text:generated")
    assert sorted(m for g in manifest.groups for m in g.members) == sorted(image_searched.result.loaded.lm_module_names())
    assert image_searched.result.is_satisfied
    assert image_searched.result.modelopt_achieved_bits == pytest.approx(image_searched.result.achieved_bits)


@pytest.mark.parametrize("method", ["gradient", "kl_div"])
def test_extract_and_mask_agree_on_image_text(image_searches, method):
    """Same data with images: the extracted-LM search (vision features built outside it) and the
    masked-VLM search (vision tower disabled inside it) make the same decisions from the same scores."""
    extract, mask = image_searches(_scheme(method, "extract")), image_searches(_scheme(method, "mask"))
    decisions = {k: {g.name: g.chosen for g in v.manifest.groups} for k, v in (("extract", extract), ("mask", mask))}
    assert decisions["extract"] == decisions["mask"]
    assert extract.result.achieved_bits == pytest.approx(mask.result.achieved_bits)
    scores = [[c.score for g in r.manifest.groups for c in g.candidates] for r in (extract, mask)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-3, abs=1e-9)


# ---- comparison with text-only --------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_manifest(pristine_vlm, text_calibration) -> Manifest:
    return pipeline.search(fresh_copy(pristine_vlm), _scheme("gradient", "extract"), text_calibration).manifest


@pytest.fixture(scope="module")
def comparison(text_manifest, image_searches) -> CalibrationComparison:
    return compare_calibration_manifests(text_manifest, image_searches(_scheme("gradient", "extract")).manifest)


def test_comparison_reports_agreement_correlation_and_moves(comparison, text_manifest):
    assert len(comparison.groups) == len(text_manifest.groups) == 16
    assert 0.0 <= comparison.agreement <= 1.0
    assert comparison.n_agree + len(comparison.moved) == len(comparison.groups)
    assert comparison.spearman is not None and -1.0 <= comparison.spearman <= 1.0
    assert dict(comparison.spearman_by_format)["fp8"] == pytest.approx(comparison.spearman)
    assert comparison.text_source.endswith("calibration_corpus.txt")
    assert comparison.image_text_source.startswith("image_text:generated")
    assert sorted(g.text_rank for g in comparison.groups) == pytest.approx(sorted(g.image_text_rank for g in comparison.groups))
    json.loads(comparison.to_json())


def test_comparison_is_deterministic_for_a_fixed_seed(pristine_vlm, comparison, text_calibration, tmp_path):
    """A second, independent run (fresh batches from the same seed, fresh searches) is equal."""
    image_again = image_text_batches(pristine_vlm.processor, num_batches=2, seq_len=SEQ_LEN, seed=SEED, vocab_size=pristine_vlm.vocab_size)
    # measure=False: the random-weight tiny model's KLD means nothing (tests/test_fidelity_compare.py measures tiny-trained)
    run = pipeline.compare_calibration(pristine_vlm, _scheme("gradient", "extract"), text_calibration, image_again, out_dir=tmp_path,
                                       measure=False)
    assert run.comparison == comparison
    assert run.comparison.to_json() == comparison.to_json()
    # and the report files it wrote
    md = (tmp_path / "comparison.md").read_text()
    assert "| decision agreement" in md and "Spearman rho" in md and "![" in md
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "comparison.json").read_text())["agreement"] == comparison.agreement
    assert Manifest.load(tmp_path / "image_text" / "manifest.json") == run.image_text_manifest


def test_identical_searches_compare_as_identical(text_manifest):
    same = compare_calibration_manifests(text_manifest, text_manifest)
    assert same.agreement == 1.0 and not same.moved and same.spearman == pytest.approx(1.0)
    assert all(g.rank_shift == 0 for g in same.groups)


def test_comparison_detects_a_tampered_result(text_manifest):
    """Negative control: flip one decision and reverse the score order -> the comparison sees both."""
    first = text_manifest.groups[0]
    other = next(c.format for c in first.candidates if c.format != first.chosen)
    flipped = text_manifest.with_groups([dataclasses.replace(first, chosen=other), *text_manifest.groups[1:]])
    moved = compare_calibration_manifests(text_manifest, flipped)
    assert [g.name for g in moved.moved] == [first.name] and moved.agreement == pytest.approx(15 / 16)
    assert "Groups whose decision moves" in moved.markdown()

    scores = sorted((c.score for g in text_manifest.groups for c in g.candidates if c.format == "fp8"))
    by_rank = {s: scores[-1 - i] for i, s in enumerate(scores)}  # largest <-> smallest
    reversed_groups = [
        dataclasses.replace(g, candidates=tuple(dataclasses.replace(c, score=by_rank[c.score]) if c.format == "fp8" else c
                                                for c in g.candidates))
        for g in text_manifest.groups
    ]
    reversed_scores = compare_calibration_manifests(text_manifest, text_manifest.with_groups(reversed_groups))
    assert reversed_scores.spearman == pytest.approx(-1.0)
    assert max(abs(g.rank_shift) for g in reversed_scores.groups) > 0


def test_comparison_refuses_different_budgets(text_manifest):
    other = dataclasses.replace(text_manifest, scheme=text_manifest.scheme.with_(target_bits=10.0))
    with pytest.raises(SchemeError, match="target_bits"):
        compare_calibration_manifests(text_manifest, other)


def test_spearman_matches_the_definition():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / 22.5**0.5)  # ties share their average rank
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_cli_compares_saved_manifests(comparison, text_manifest, image_searches, tmp_path, capsys):
    from vlq.cli import main

    text_path = text_manifest.save(tmp_path / "t.json")
    image_path = image_searches(_scheme("gradient", "extract")).manifest.save(tmp_path / "i.json")
    out = tmp_path / "cmp"
    assert main(["compare-calibration", "--text-manifest", str(text_path), "--image-manifest", str(image_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Text-only vs image+text calibration" in printed and "decision agreement" in printed
    assert json.loads((out / "comparison.json").read_text()) == json.loads(comparison.to_json())
    assert (out / "comparison.png").stat().st_size > 0


@pytest.mark.slow
def test_cli_compare_calibration_searches_both(tmp_path, monkeypatch):
    """The full command as users run it: load, both searches with guards, report files."""
    from vlq.cli import main

    monkeypatch.setenv("VLQ_CACHE_DIR", str(tmp_path / "cache"))

    out = tmp_path / "cmp"
    code = main(["compare-calibration", "--formats", "fp8", "--bits", "12", "--calib-steps", "1", "--score-steps", "1",
                 "--seq-len", str(SEQ_LEN), "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"comparison.md", "comparison.json", "comparison.png", "text", "image_text"}
    # each calibration's scheme measured at point a on held-out text and image+text, beside the agreement
    assert [p["data_kind"] for p in json.loads((out / "comparison.json").read_text())["fidelity"]] == ["text", "image_text"]
    assert "mean KLD image+text" in (out / "comparison.md").read_text()


def test_cli_image_text_search(tmp_path, monkeypatch):
    """`vlq search --images generated`: an image+text LM-only search from the command line."""
    from vlq.cli import main

    monkeypatch.setenv("VLQ_CACHE_DIR", str(tmp_path / "cache"))

    out = tmp_path / "run"
    assert main(["search", "--images", "generated", "--formats", "fp8", "--bits", "12", "--calib-steps", "1",
                 "--score-steps", "1", "--seq-len", str(SEQ_LEN), "--out", str(out)]) == 0
    manifest = Manifest.load(out / "manifest.json")
    assert manifest.calibration_source.startswith("image_text:generated")
    # `vlq export` rebuilds the same image+text batches from the manifest and restores the state
    assert main(["export", str(out)]) == 0
    manifest.verify(checkpoint=out / "checkpoint").require()


# ---- gpu lane: the 3B architecture ---------------------------------------------------------------


@pytest.mark.gpu
def test_3b_image_text_search_both_strategies_and_comparison(gpu_pristine_vlm, tmp_path):
    """3B on one GPU: image+text batches built without a processor (pixel_values of the grid's shape,
    image-pad runs in input_ids); extract forward == VLM forward; both strategies keep the vision
    tower BF16, verify their manifests and agree; then the comparison with text-only runs."""
    import gc

    from vlq.data.calibration import synthetic_text_calibration

    loaded = gpu_pristine_vlm
    seq_len, steps = 512, 4
    image_text = synthetic_image_text_batches(loaded.config, vocab_size=loaded.vocab_size, num_batches=steps,
                                              seq_len=seq_len, image_grid=(1, 16, 16), seed=SEED)
    text = synthetic_text_calibration(loaded.config, vocab_size=loaded.vocab_size, num_batches=steps, seq_len=seq_len)
    fingerprint = fingerprint_parameters(loaded.vlm.get_submodule(loaded.vision.root))
    with torch.no_grad():
        batch = image_text.to("cuda").batches[0]
        extract = make_forward_step(loaded, "extract")(loaded.language_model, batch)
        full = make_forward_step(loaded, "mask")(loaded.vlm, batch)
    torch.testing.assert_close(extract.float(), full.float(), rtol=2e-2, atol=2e-2)
    del extract, full

    formats = ("fp8", "nvfp4")
    decisions, manifests = {}, {}
    for strategy in ("extract", "mask", "text"):
        image = strategy != "text"
        scheme = Scheme(formats=formats, target_bits=6.0, method="gradient", strategy=strategy if image else "mask",
                        num_calib_steps=steps, num_score_steps=steps, seq_len=seq_len)
        copy_ = fresh_copy(loaded)
        searched = None
        try:
            searched = pipeline.search(copy_, scheme, image_text if image else text)  # guards and manifest checks required
            manifest = searched.manifest
            assert [c.name for c in searched.checks][:2] == [VisionGuard.name, LmHeadGuard.name]
            if strategy == "mask":  # one export of the full-size model is enough to check the config on disk
                exported = pipeline.export(searched, tmp_path / strategy)
                assert all(c.ok for c in exported.checks)
            manifests[strategy] = manifest
            decisions[strategy] = {g.name: g.chosen for g in manifest.groups}
            print(f"\n[gpu] {'image+text' if image else 'text-only'} {scheme.id}: {searched.result.times} "
                  f"formats {manifest.format_counts()}")
        finally:
            del copy_, searched
            gc.collect()
            torch.cuda.empty_cache()
    agree = sum(decisions["extract"][n] == decisions["mask"][n] for n in decisions["extract"])
    # bf16 GPU kernels are not bitwise deterministic across the two graphs: allow a few near-ties
    assert agree >= 0.95 * len(decisions["extract"]), f"strategies agree on only {agree}/{len(decisions['extract'])} groups"
    assert fingerprint_parameters(loaded.vlm.get_submodule(loaded.vision.root)) == fingerprint

    comparison = compare_calibration_manifests(manifests["text"], manifests["mask"])
    assert len(comparison.groups) == len(manifests["text"].groups) > 0
    assert comparison.spearman is not None
    comparison.write(tmp_path / "compare")
    assert (tmp_path / "compare" / "comparison.png").exists()
    print(comparison.markdown())

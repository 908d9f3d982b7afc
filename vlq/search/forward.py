"""The forward step a search (and a fidelity measurement) runs per batch, for either restriction strategy:
``extract`` runs the text model and the parent's ``lm_head``; ``mask`` runs the whole VLM."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..data.models import LoadedVLM


def _model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}


def _vlm_parent(loaded: LoadedVLM) -> nn.Module:
    """The module that owns the vision tower and the text model (``Qwen2_5_VLModel``)."""
    parent_path = loaded.lm_path.rsplit(".", 1)[0] if "." in loaded.lm_path else ""
    return loaded.vlm.get_submodule(parent_path) if parent_path else loaded.vlm


def image_text_inputs(loaded: LoadedVLM, text_model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Text-model inputs for an image+text batch, built outside the searched text model.

    The BF16 vision tower encodes ``pixel_values`` under ``no_grad`` (nothing of it is searched, and no
    gradient reaches it); its features replace the image-pad embeddings, and the 3-D mrope positions
    come from the parent's ``get_rope_index`` — the same methods the parent's own forward uses, so the
    logits equal the full VLM's (``tests/test_image_text.py::test_extract_forward_equals_vlm_forward``).
    Text embeddings come from the text model's own ``embed_tokens``, so gradient scoring sees the
    same graph as on text-only data.
    """
    parent = _vlm_parent(loaded)
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    grid = inputs["image_grid_thw"]
    types = inputs.get("mm_token_type_ids")
    if types is None:
        types = (input_ids == loaded.config.image_token_id).long()
    with torch.inference_mode(False), torch.no_grad():  # kl_div scores under inference mode
        features = parent.get_image_features(inputs["pixel_values"], grid, return_dict=True).pooler_output
        image_embeds = torch.cat(tuple(features), dim=0)
        position_ids, _ = parent.get_rope_index(input_ids, types, image_grid_thw=grid, attention_mask=attention_mask)
    embeds = text_model.get_input_embeddings()(input_ids)
    image_mask, _ = parent.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=image_embeds)
    embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.device, embeds.dtype))
    return {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids}


def make_forward_step(
    loaded: LoadedVLM, strategy: str, *, logits: bool = True
) -> Callable[[nn.Module, dict], torch.Tensor]:
    """Forward returning logits. For ``extract`` the parent's lm_head turns hidden states into logits
    (``logits=False``: the last hidden states, for :func:`chunked_causal_lm_loss`).

    Image+text batches (``pixel_values`` present): ``mask`` runs the whole VLM as is (the vision tower
    is disabled and cost-excluded); ``extract`` builds ``inputs_embeds`` and mrope ``position_ids``
    with :func:`image_text_inputs` and calls the text model with them.
    """
    device = loaded.device
    if not logits and strategy != "extract":
        raise ValueError("Only the extract strategy can return hidden states (mask runs the VLM's own lm_head).")
    if strategy == "extract":
        lm_head = loaded.lm_head

        def forward_extract(model, batch):
            inputs = _model_inputs(batch, device)
            if inputs.get("pixel_values") is not None:
                inputs = image_text_inputs(loaded, model, inputs)
            else:
                inputs.pop("pixel_values", None)
                inputs.pop("image_grid_thw", None)
                inputs.pop("mm_token_type_ids", None)
            if "inputs_embeds" in inputs:
                inputs.pop("input_ids", None)
            hidden = model(**inputs, use_cache=False).last_hidden_state
            return lm_head(hidden) if logits else hidden

        return forward_extract

    def forward_mask(model, batch):
        return model(**_model_inputs(batch, device), use_cache=False).logits

    return forward_mask

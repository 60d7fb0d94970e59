"""Token ids that released checkpoints leave out of config.json, filled in per family.

Upstream code passes these ids to its generate() instead of reading them from config.json, so
the released files lack them; users should not have to edit downloaded files. A value is filled
only where the field is absent (or null) and the id fits the config's vocabulary, so a checkpoint
that defines its own ids, or a small model with its own vocabulary, is never changed.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# workers.models.family_name(raw) -> field -> (value, where the value comes from)
KNOWN_FIELDS: dict[str, dict[str, tuple[int, str]]] = {
    "llada": {
        # LLaDA-8B-Base/Instruct and LLaDA-1.5 carry both in config.json (generate.py: mask_id)
        "mask_token_id": (126336, "LLaDA's <|mdm_mask|>, generate.py's mask_id"),
        "eos_token_id": (126081, "LLaDA's end of text, its config.json's eos_token_id"),
    },
    "lladamoe": {
        # LLaDA-MoE-7B-A1B: the model card's generate(mask_id=156895); dInfer and llama.cpp's
        # converter hard-code the same ids for this tokenizer (eos_id=156892)
        "mask_token_id": (156895, "LLaDA-MoE's mask token, its model card's generate() mask_id"),
        "eos_token_id": (156892, "LLaDA-MoE's end of text, dInfer's eos_id for it"),
    },
    "llada2_moe": {
        # LLaDA2.0/2.1 mini and flash: upstream generate() defaults mask_id=156895, eos_id=156892
        # (the eos is also their pad_token_id): the same ids as LLaDA-MoE's
        "mask_token_id": (156895, "LLaDA2's mask token, upstream generate()'s mask_id"),
        "eos_token_id": (156892, "LLaDA2's end of text, upstream generate()'s eos_id"),
    },
    "Dream": {
        # Dream-v0-Base/Instruct-7B ship both in config.json (151643 is also their pad_token_id)
        "mask_token_id": (151666, "Dream's <|mask|>, its config.json's mask_token_id"),
        "eos_token_id": (151643, "Dream's end of text, its config.json's eos_token_id"),
    },
}


def fill_known_fields(raw: dict, family: str | None) -> dict:
    """A copy of config.json's dict with the family's known ids added where they are missing."""
    known = KNOWN_FIELDS.get(family or "", {})
    vocab = raw.get("vocab_size")
    out = dict(raw)
    for field, (value, source) in known.items():
        if out.get(field) is not None:
            continue
        if not isinstance(vocab, int) or not 0 <= value < vocab:
            log.debug("config.json: %s absent; %d does not fit vocab_size %r", field, value, vocab)
            continue
        out[field] = value
        log.info("config.json has no %s: using %d (%s)", field, value, source)
    return out

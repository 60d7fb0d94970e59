"""The model directory's tokenizer, loaded offline through transformers.AutoTokenizer."""

from __future__ import annotations

from pathlib import Path

from workers.errors import ModelLoadError


def load_tokenizer(path: str | Path):
    # local_files_only, not a process-wide HF_HUB_OFFLINE: a later Hub id may still download
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(
            f"{path}: no tokenizer files (tokenizer.json or tokenizer.model); "
            "copy them from the model's release"
        )
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # config.json's model_type is ours, not a transformers class
    try:
        return AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # transformers raises many types; name the directory and the cause
        raise ModelLoadError(f"{path}: the tokenizer failed to load: {e}") from e
    finally:
        logging.set_verbosity(verbosity)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` under the directory's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "messages: this model's tokenizer has no chat template; send a raw prompt instead"
        )
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of raw text, with the tokenizer's BOS when it defines one (as LLaDA does)."""
    return tokenizer(text)["input_ids"]

"""The model argument -> a local directory: a path, or a Hugging Face id read from the hub cache.

Users of vLLM and SGLang pass `org/name` and expect the local Hugging Face cache to be used, so:
an existing directory wins; otherwise an id is looked up in the cache first (no network), and
downloaded only when the cache lacks it and HF_HUB_OFFLINE is not set. Every failure is one
ModelLoadError line saying what to do.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from workers.errors import ModelLoadError

log = logging.getLogger(__name__)

# An id is `org/name` (Hugging Face allows letters, digits, '-', '_', '.'; no '--' or '..').
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")
# Only what the loader reads: no duplicate .bin / .pth weights, no images or code.
PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
TRUE = {"1", "on", "yes", "true"}


def is_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and "--" not in text and ".." not in text


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


def cache_dir() -> str:
    """The hub cache as the environment names it now, with huggingface_hub's precedence."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve_model(model: str | Path | None, revision: str | None = None) -> Path:
    """The local directory for `model`: None (the bundled model), a directory, or a hub id."""
    if model is None:
        from workers.bundled import MODEL_DIR

        return MODEL_DIR
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model {str(model)!r} is a file; pass the directory that holds it")
    text = str(model)
    if not is_hub_id(text):
        raise ModelLoadError(
            f"model {text!r}: no such directory, and not a Hugging Face id (org/name); pass a "
            "local model directory or an id such as GSAI-ML/LLaDA-8B-Instruct"
        )
    return _from_hub(text, revision)


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = cache_dir()
    get = "`hf download " + repo_id + "` (or `huggingface-cli download " + repo_id + "`)"
    try:
        found = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, local_files_only=True
        )
        log.info("model %s: using the cached snapshot %s", repo_id, found)
        return Path(found)
    except LocalEntryNotFoundError:
        pass
    if offline():
        raise ModelLoadError(
            f"model {repo_id!r}: no such local directory, and not in the Hugging Face cache "
            f"({cache}) while HF_HUB_OFFLINE is set; download it first with {get}, or unset "
            "HF_HUB_OFFLINE"
        ) from None
    log.info("model %s: not in the cache; downloading it from the Hugging Face Hub", repo_id)
    try:
        found = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=PATTERNS
        )
    except GatedRepoError as e:
        raise ModelLoadError(
            f"model {repo_id!r} is gated: accept its terms on https://huggingface.co/{repo_id} and "
            "log in with `hf auth login`"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(
            f"model {repo_id!r}: no such model on the Hugging Face Hub (if it is private, log in "
            "with `hf auth login`); or pass a local directory"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"model {repo_id!r} has no revision {revision!r}") from e
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ModelLoadError(
            f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and the download failed "
            f"({type(e).__name__}); download it with {get} where the Hub is reachable, or point "
            "HF_HUB_CACHE at a cache that has it"
        ) from e
    return Path(found)

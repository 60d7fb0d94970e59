"""Model families, keyed by config.json's `model_type` (and `architectures` where two share one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from workers.models.dream import DreamConfig, DreamModel
from workers.models.layers import DiffusionLM
from workers.models.llada import LLaDAConfig, LLaDAModel
from workers.models.llada2 import LLaDA2Config, LLaDA2Model
from workers.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel


class ConfigClass(Protocol):
    """A family's config class: `from_dict(raw config.json dict)` -> its config."""

    def from_dict(self, raw: dict) -> Any: ...


FAMILIES: dict[str, tuple[ConfigClass, Callable[[Any], DiffusionLM]]] = {
    "llada": (LLaDAConfig, LLaDAModel),  # LLaDA-8B, LLaDA-1.5
    "lladamoe": (LLaDAMoEConfig, LLaDAMoEModel),  # LLaDA-MoE-7B-A1B (and -TD)
    "llada2_moe": (LLaDA2Config, LLaDA2Model),  # LLaDA2.0 / 2.1 mini and flash
    "Dream": (DreamConfig, DreamModel),  # Dream-v0 7B
}
# LLaDA-MoE's released config.json says model_type "llada", like the dense model; its
# architectures entry tells them apart.
MOE_ARCHITECTURES = {"LLaDAMoEModelLM", "LLaDAMoEModel"}


def family_name(raw: dict) -> str | None:
    """The FAMILIES key for a config.json dict, or None when no family matches."""
    model_type = raw.get("model_type")
    if model_type == "llada" and MOE_ARCHITECTURES & set(raw.get("architectures") or ()):
        return "lladamoe"
    return model_type if model_type in FAMILIES else None


__all__ = [
    "FAMILIES",
    "family_name",
    "DreamConfig",
    "DreamModel",
    "LLaDAConfig",
    "LLaDAModel",
    "LLaDAMoEConfig",
    "LLaDAMoEModel",
    "LLaDA2Config",
    "LLaDA2Model",
]

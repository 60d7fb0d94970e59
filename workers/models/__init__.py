"""Model families, keyed by config.json's `model_type`."""

from __future__ import annotations

from workers.models.llada import LLaDAConfig, LLaDAModel

FAMILIES = {"llada": (LLaDAConfig, LLaDAModel)}

__all__ = ["FAMILIES", "LLaDAConfig", "LLaDAModel"]

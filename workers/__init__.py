"""Everything that runs next to the model: model families, decoders, caches, the engine."""

from workers.engine import Engine, GenerationResult

__all__ = ["Engine", "GenerationResult"]

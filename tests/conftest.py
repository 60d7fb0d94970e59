"""Shared fixtures: tiny LLaDA configs and randomly initialised models.

The models are random on purpose: with the default init (norm weights all ones, small linear
weights) several bugs -- an ignored norm weight, a swapped gate/up projection -- would not change
the output enough to notice. Drawing every parameter with a sizeable std makes them show.
"""

from __future__ import annotations

import pytest
import torch

from workers.models.llada import LLaDAConfig, LLaDAModel

# The test tensors are tiny: one intra-op thread avoids OpenMP hand-off costs that, on a busy
# 2-core machine, made a 4x9-token forward take ~0.25 s instead of ~1 ms.
torch.set_num_threads(1)


def tiny_raw_config(**overrides) -> dict:
    """The raw config.json dict of a tiny LLaDA model; keyword arguments replace fields."""
    raw = dict(
        model_type="llada",
        d_model=48,
        n_heads=6,
        n_kv_heads=2,
        n_layers=2,
        mlp_hidden_size=64,
        vocab_size=40,
        embedding_size=48,
        mask_token_id=39,
        eos_token_id=1,
        rope_theta=10000.0,
    )
    raw.update(overrides)
    return raw


def random_model(raw: dict, seed: int = 0, std: float = 0.3, dtype=torch.float64) -> LLaDAModel:
    """A LLaDAModel for `raw` whose parameters are all drawn from a seeded normal distribution.

    Norm weights are drawn around 1 (1 + std * N(0, 1)) so they are neither trivial nor near zero.
    """
    model = LLaDAModel(LLaDAConfig.from_dict(raw)).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * std
            p.copy_(noise + 1.0 if name.endswith("norm.weight") or "ln_f" in name else noise)
    return model.eval().requires_grad_(False)


@pytest.fixture
def raw_config():
    """Factory fixture: `raw_config(**overrides)` -> a tiny raw config dict."""
    return tiny_raw_config


@pytest.fixture
def make_model():
    """Factory fixture: `make_model(raw, seed=0, std=0.3, dtype=torch.float64)` -> random model."""
    return random_model

"""Random tiny LLaDA models for tests: small enough for float64 on CPU, big enough to disagree
when something is wrong (weights drawn wide, so predictions are far from uniform)."""

from __future__ import annotations

import torch

from workers.models.llada import LLaDAConfig, LLaDAModel


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


def tiny_model(seed: int = 0, dtype=torch.float64, std: float = 0.5, **overrides) -> LLaDAModel:
    """random_model of tiny_raw_config(**overrides)."""
    return random_model(tiny_raw_config(**overrides), seed=seed, std=std, dtype=dtype)


def random_prompts(seed: int, lengths: list[int], vocab: int, mask_id: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        ids[ids == mask_id] = 2
        prompts.append(ids.tolist())
    return prompts


class Recorder:
    """Wraps a model and keeps a copy of every input batch, to inspect what a sampler did."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    @property
    def lm_head_weight(self):
        return self.model.lm_head_weight

    @property
    def config(self):
        return self.model.config

    def __call__(self, ids, *args, **kwargs):
        self.inputs.append(ids.clone())
        return self.model(ids, *args, **kwargs)

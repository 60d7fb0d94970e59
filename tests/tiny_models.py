"""Random tiny LLaDA models for tests: small enough for float64 on CPU, big enough to disagree
when something is wrong (weights drawn wide, so predictions are far from uniform)."""

from __future__ import annotations

import torch

from workers.models.llada import LLaDAConfig, LLaDAModel

BASE = dict(
    model_type="llada", d_model=48, n_heads=6, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
    vocab_size=40, embedding_size=48, mask_token_id=39, eos_token_id=1, rope_theta=10000.0,
)


def tiny_model(seed: int = 0, dtype=torch.float64, std: float = 0.5, **overrides) -> LLaDAModel:
    torch.manual_seed(seed)
    model = LLaDAModel(LLaDAConfig.from_dict({**BASE, **overrides}))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model.to(dtype).eval().requires_grad_(False)


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

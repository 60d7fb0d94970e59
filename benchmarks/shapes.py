"""Released model shapes the GPU benchmarks build with random weights (config facts only)."""

from __future__ import annotations

import torch

# GSAI-ML/LLaDA-8B-Instruct's config.json fields the LLaDA family reads
LLADA_8B = dict(
    model_type="llada",
    d_model=4096,
    n_heads=32,
    n_kv_heads=32,
    n_layers=32,
    mlp_hidden_size=12288,
    vocab_size=126464,
    embedding_size=126464,
    mask_token_id=126336,
    eos_token_id=126081,
    rope_theta=500000.0,
)


def llada8b(device: str | torch.device, dtype: torch.dtype = torch.bfloat16):
    """An LLaDA-8B-shaped model with random weights, for inference only."""
    from workers.models.llada import LLaDAConfig, LLaDAModel

    with torch.device(device):
        model = LLaDAModel(LLaDAConfig.from_dict(dict(LLADA_8B)))
    return model.to(dtype).eval().requires_grad_(False)

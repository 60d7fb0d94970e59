"""Released model shapes the GPU benchmarks build with random weights (config facts only)."""

from __future__ import annotations

import argparse

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


def add_llada_shape_flags(
    ap: argparse.ArgumentParser, d_model: int, heads: int, layers: int, mlp: int, vocab: int
) -> None:
    """--d-model, --heads, --layers, --mlp, --vocab: a random LLaDA-shaped model's size."""
    ap.add_argument("--d-model", type=int, default=d_model)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--mlp", type=int, default=mlp)
    ap.add_argument("--vocab", type=int, default=vocab)


def llada_raw_config(args: argparse.Namespace) -> dict:
    """The config.json of a LLaDA-shaped model sized by add_llada_shape_flags' flags."""
    return dict(
        model_type="llada",
        d_model=args.d_model,
        n_heads=args.heads,
        n_kv_heads=args.heads,
        n_layers=args.layers,
        mlp_hidden_size=args.mlp,
        vocab_size=args.vocab,
        embedding_size=args.vocab,
        mask_token_id=args.vocab - 1,
        eos_token_id=1,
    )

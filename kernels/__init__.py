"""Kernels of a diffusion step, chosen by device in one place.

Every op has a plain-torch reference (kernels.reference), used on CPU; CUDA tensors go to the
Triton kernels of kernels.triton_ops. Nothing outside this package branches on the device.
Paths not yet checked on a GPU are switched in kernels.options (environment variables, or
`configured(...)` in code): the routed experts' path (`routed_experts`, see `moe_path`) and the
split confidence kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from dinfer_kernels import reference
from dinfer_kernels.moe import ExpertWeights, dense_experts
from dinfer_kernels.options import configured, options

_TRITON: dict[str, Callable[..., Any]] | None = None  # op name -> Triton kernel, loaded lazily
_TRITON_EVERYWHERE = False


def _triton() -> dict[str, Callable[..., Any]]:
    global _TRITON
    if _TRITON is None:
        try:
            from dinfer_kernels.triton_ops import KERNELS

            _TRITON = dict(KERNELS)
        except ImportError:  # no triton installed: the references run on CUDA too
            _TRITON = {}
    return _TRITON


@contextlib.contextmanager
def triton_everywhere():
    """Send CPU tensors to the Triton kernels too: with TRITON_INTERPRET=1 set before triton is
    imported, tests run the whole engine through the kernels on a machine without a GPU."""
    global _TRITON_EVERYWHERE
    before, _TRITON_EVERYWHERE = _TRITON_EVERYWHERE, True
    try:
        yield
    finally:
        _TRITON_EVERYWHERE = before


def _pick(name: str, tensor):
    if tensor.is_cuda or _TRITON_EVERYWHERE:
        kernel = _triton().get(name)
        if kernel is not None:
            return kernel
    return getattr(reference, name)


def rms_norm(x, weight, eps):
    return _pick("rms_norm", x)(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    """(RMSNorm(x + residual), x + residual): the residual add fused into the norm after it."""
    return _pick("add_rms_norm", x)(x, residual, weight, eps)


def rope(x, cos, sin):
    return _pick("rope", x)(x, cos, sin)


def swiglu(gate, up):
    return _pick("swiglu", gate)(gate, up)


def attention(q, k, v, key_mask):
    return _pick("attention", q)(q, k, v, key_mask)


def cached_attention(q, k, v, cache_k, cache_v, start, key_mask, write):
    """Queries of the fed tokens over a cache view, their own k, v at [start, ...), written in
    place when `write` (kernels.reference.cached_attention)."""
    return _pick("cached_attention", q)(q, k, v, cache_k, cache_v, start, key_mask, write)


def confidence(logits, temperature=None, seeds=None):
    """logits [B, K, V] -> (token, probability float64) [B, K]: greedy, or Gumbel-max with
    per-request `temperature` [B] and `seeds` [B] int64 (see kernels.reference.confidence)."""
    return _pick("confidence", logits)(logits, temperature, seeds)


def confidence_runner_up(logits, current, temperature=None, seeds=None):
    """confidence() plus (runner-up token by logit, its probability, probability of `current`
    [B, K]): for token-editing decoders; the plain confidence() does none of this extra work."""
    return _pick("confidence_runner_up", logits)(logits, current, temperature, seeds)


# the dense path's extra multiply-adds, N (E - k) 3 H d, below which "auto" takes it on a CPU
DENSE_EXTRA_MACS = 1 << 24


def moe_path(h: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights) -> str:
    """Which routed-experts path runs: "loop" (the reference, host-side counts), "dense"
    (kernels.moe.dense_experts: no host reads, E/k times the work) or "grouped" (the Triton
    grouped GEMM, kernels/triton_moe.py). kernels.options.moe picks one; "auto" means: on CUDA
    (and under triton_everywhere) the loop, until a GPU run has checked the grouped kernel; on a
    CPU, where a host read costs nothing, the dense path only while its extra work is below
    DENSE_EXTRA_MACS (tiny models: a step then reads nothing on the host), else the loop.
    "grouped" without a usable kernel (no Triton, a CPU tensor, float64 on CUDA) runs "dense"."""
    path = options.moe
    gpu = h.is_cuda or _TRITON_EVERYWHERE
    if path == "auto":
        N, k = ids.shape
        extra = N * (experts.num_experts - k) * 3 * experts.hidden * experts.d_model
        path = "loop" if gpu or extra > DENSE_EXTRA_MACS else "dense"
    if path == "grouped":
        usable = gpu and not (h.is_cuda and h.dtype == torch.float64)
        if not usable or _triton().get("routed_experts") is None:
            path = "dense"
    return path


def routed_experts(
    h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """sum_j weights[:, j] * expert_{ids[:, j]}(h): h [N, d], ids and weights [N, k] -> [N, d] in
    weights' dtype, SwiGLU experts (kernels.reference.routed_experts); the path: moe_path."""
    path = moe_path(h, ids, experts)
    if path == "grouped":
        return _triton()["routed_experts"](h, ids, weights, experts)
    if path == "dense":
        return dense_experts(h, ids, weights, experts)
    return reference.routed_experts(h, ids, weights, experts)


def threshold_commit(conf, masked, tau):
    return _pick("threshold_commit", conf)(conf, masked, tau).bool()


def factor_commit(conf, masked, f):
    return _pick("factor_commit", conf)(conf, masked, f).bool()


def hierarchical_commit(conf, masked, tau, low):
    return _pick("hierarchical_commit", conf)(conf, masked, tau, low).bool()


__all__ = [
    "DENSE_EXTRA_MACS",
    "ExpertWeights",
    "add_rms_norm",
    "attention",
    "cached_attention",
    "confidence",
    "confidence_runner_up",
    "configured",
    "factor_commit",
    "hierarchical_commit",
    "moe_path",
    "options",
    "reference",
    "rms_norm",
    "rope",
    "routed_experts",
    "swiglu",
    "threshold_commit",
    "triton_everywhere",
]

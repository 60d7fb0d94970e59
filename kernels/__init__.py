"""Kernels of a diffusion step, chosen by device in one place.

Every op has a plain-torch reference (kernels.reference), used on CPU; CUDA tensors go to the
Triton kernels of kernels.triton_ops where an op has one (attention does not yet). Nothing
outside this package branches on the device.
"""

from __future__ import annotations

from kernels import reference

_TRITON: dict[str, object] | None = None  # op name -> Triton kernel; loaded on the first CUDA tensor


def _triton() -> dict[str, object]:
    global _TRITON
    if _TRITON is None:
        try:
            from kernels.triton_ops import KERNELS
        except ImportError:  # no triton installed: the references run on CUDA too
            KERNELS = {}
        _TRITON = dict(KERNELS)
    return _TRITON


def _pick(name: str, tensor):
    if tensor.is_cuda:
        kernel = _triton().get(name)
        if kernel is not None:
            return kernel
    return getattr(reference, name)


def rms_norm(x, weight, eps):
    return _pick("rms_norm", x)(x, weight, eps)


def rope(x, cos, sin):
    return _pick("rope", x)(x, cos, sin)


def swiglu(gate, up):
    return _pick("swiglu", gate)(gate, up)


def attention(q, k, v, key_mask):
    if key_mask is not None and key_mask.dim() == 3:  # per-query masks: the Triton kernel takes [B, Lk]
        return reference.attention(q, k, v, key_mask)
    return _pick("attention", q)(q, k, v, key_mask)


def confidence(logits):
    return _pick("confidence", logits)(logits)


def threshold_commit(conf, masked, tau):
    return _pick("threshold_commit", conf)(conf, masked, tau).bool()


def factor_commit(conf, masked, f):
    return _pick("factor_commit", conf)(conf, masked, f).bool()


def hierarchical_commit(conf, masked, tau, low):
    return _pick("hierarchical_commit", conf)(conf, masked, tau, low).bool()


__all__ = ["attention", "confidence", "factor_commit", "hierarchical_commit", "reference", "rms_norm", "rope", "swiglu",
           "threshold_commit"]

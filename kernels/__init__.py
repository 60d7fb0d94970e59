"""Kernels of a diffusion step, chosen by device in one place.

Every op has a plain-torch reference (kernels.reference). Triton versions plug in through
`_triton_impl`; until an op has one, CUDA tensors use the reference too. Nothing outside this
package branches on the device.
"""

from __future__ import annotations

from kernels import reference

_TRITON: dict[str, object] = {}  # op name -> Triton implementation, registered by kernels.triton_*


def _pick(name: str, tensor):
    if tensor.is_cuda and name in _TRITON:
        return _TRITON[name]
    return getattr(reference, name)


def rms_norm(x, weight, eps):
    return _pick("rms_norm", x)(x, weight, eps)


def rope(x, cos, sin):
    return _pick("rope", x)(x, cos, sin)


def swiglu(gate, up):
    return _pick("swiglu", gate)(gate, up)


def attention(q, k, v, key_mask):
    return _pick("attention", q)(q, k, v, key_mask)


def confidence(logits):
    return _pick("confidence", logits)(logits)


__all__ = ["attention", "confidence", "reference", "rms_norm", "rope", "swiglu"]

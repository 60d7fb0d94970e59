"""Switches for kernel paths that are new and not yet checked on a GPU.

Why a module of its own: the dispatcher (kernels/__init__.py) and the Triton wrappers
(kernels/triton_ops.py) both read them, and a CUDA-only path stays opt-in until a GPU run of
benchmarks/run_on_gpu.sh has checked it. Defaults come from the environment, so a benchmark or a
worker can turn a path on without code changes:

    DINFER_MOE=auto|loop|dense|grouped     routed experts (kernels.routed_experts)
    DINFER_CONFIDENCE_SPLIT=0|1            split the vocabulary over programs on CUDA
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields

MOE_PATHS = ("auto", "loop", "dense", "grouped")


@dataclass
class Options:
    """moe: which routed-experts path runs (see kernels.routed_experts); confidence_split: whether
    the Triton confidence kernel may split a row's vocabulary over programs (on CUDA; tests under
    the interpreter force a split count instead)."""

    moe: str = "auto"
    confidence_split: bool = False

    def check(self) -> Options:
        if self.moe not in MOE_PATHS:
            raise ValueError(f"moe={self.moe!r}: choose one of {MOE_PATHS} (env DINFER_MOE)")
        return self


def _from_env() -> Options:
    split = os.environ.get("DINFER_CONFIDENCE_SPLIT", "0")
    if split not in ("0", "1"):
        raise ValueError(f"DINFER_CONFIDENCE_SPLIT={split!r}: set it to 0 or 1")
    return Options(moe=os.environ.get("DINFER_MOE", "auto"), confidence_split=split == "1").check()


options = _from_env()


@contextlib.contextmanager
def configured(**changes: str | bool) -> Iterator[Options]:
    """Change options inside a `with` block (tests, benchmarks), restored on exit."""
    names = {f.name for f in fields(Options)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown kernel options {unknown}; known: {sorted(names)}")
    before = {name: getattr(options, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(options, name, value)
        yield options.check()
    finally:
        for name, value in before.items():
            setattr(options, name, value)

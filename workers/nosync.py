"""Checking that a block's decoding steps never wait on the host (issue 15, item 2).

The steps between two host checks of a BlockRound (workers/iteration.py) must queue on the
device without a host sync: no `.item()`, `.tolist()`, `bool(tensor)`, `nonzero()`, boolean-mask
indexing, device-to-host copies or uploads. `forbid_host_sync()` makes them raise: on CUDA with
`torch.cuda.set_sync_debug_mode("error")`; elsewhere (the CPU tests, where no copy is a real sync)
by refusing the operations that would sync on a GPU. `DINFER_SYNC_CHECK=1` in the environment
runs every step region of every round under it (tests, the GPU benchmark); unset, it costs
nothing. The CPU form patches torch.Tensor methods process-wide while active: for tests and
benchmarks, not for a server with other threads using torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncError(RuntimeError):
    """An operation inside a step region would make the host wait for the device."""


def enabled() -> bool:
    return os.environ.get("DINFER_SYNC_CHECK", "") not in ("", "0")


def step_region(device: torch.device | str) -> contextlib.AbstractContextManager[None]:
    """The context a round's steps run in: forbid_host_sync() if DINFER_SYNC_CHECK is set."""
    return forbid_host_sync(device) if enabled() else contextlib.nullcontext()


@contextlib.contextmanager
def forbid_host_sync(device: torch.device | str = "cpu") -> Iterator[None]:
    """Inside, an operation that would sync the host with the device raises HostSyncError (on
    CUDA: torch's RuntimeError from the sync debug mode)."""
    if torch.device(device).type == "cuda":
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(before)
        return
    with _patched(), _SyncOps():
        yield


# aten ops whose result size or value the host must read (a sync on a GPU)
_SYNCING = {
    "_local_scalar_dense",  # .item(), bool(t), int(t), float(t)
    "nonzero",
    "argwhere",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "bincount",
    "equal",
    "is_nonzero",
}


def _bool_index(args: Any) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class _SyncOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNCING:
            raise HostSyncError(f"{name} inside a step region reads the device on the host")
        if name in ("index", "index_put", "index_put_") and _bool_index(args):
            raise HostSyncError(f"boolean-mask {name} inside a step region (its size syncs)")
        if name == "repeat_interleave" and "output_size" not in (kwargs or {}):
            raise HostSyncError("repeat_interleave without output_size inside a step region")
        return func(*args, **(kwargs or {}))


def _refuse(what: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise HostSyncError(f"{what} inside a step region copies device data to the host")

    return refuse


def _to_guard(original: Callable[..., Any]) -> Callable[..., Any]:
    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        targets = [*args, kwargs.get("device")]
        if any(isinstance(a, (str, torch.device)) for a in targets):
            raise HostSyncError("Tensor.to(device) inside a step region is a transfer")
        return original(self, *args, **kwargs)

    return to


def _upload_guard(original: Callable[..., Any]) -> Callable[..., Any]:
    def make(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("device") is not None:
            raise HostSyncError("torch.tensor(..., device=) inside a step region is an upload")
        return original(*args, **kwargs)

    return make


@contextlib.contextmanager
def _patched() -> Iterator[None]:
    T = torch.Tensor
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__"):
        patch(T, name, _refuse(f"Tensor.{name}"))
    patch(T, "to", _to_guard(T.to))
    patch(torch, "tensor", _upload_guard(torch.tensor))
    patch(torch, "as_tensor", _upload_guard(torch.as_tensor))
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)

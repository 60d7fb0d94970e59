"""Which GPUs each launched worker group gets: worker i of tensor-parallel size T takes
gpus[i*T:(i+1)*T] (default: every visible GPU), and the flags that tell the worker so.

The GPUs are counted without torch (the client never imports it, and initialising CUDA here
would hold memory on a GPU and make the process unsafe to fork): CUDA_VISIBLE_DEVICES when it is
set (the worker processes inherit it, so its count is theirs), else the lines of `nvidia-smi -L`.
When neither answers, the workers' own check (torch.cuda.device_count) is the one that refuses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping

from dinfer_async.errors import InvalidRequestError


def visible_gpus(env: Mapping[str, str] | None = None, smi: bool = True) -> int | None:
    """How many GPUs a worker started from here may use, or None if that cannot be told."""
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        count = 0
        for entry in listed.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-"):  # CUDA stops at the first invalid entry
                break
            count += 1
        return count
    if not smi or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(line.startswith("GPU ") for line in out.splitlines())


def place(
    device: str,
    workers: int,
    tensor_parallel_size: int = 1,
    gpus: list[int] | None = None,
    visible: int | None = None,
) -> list[list[str]]:
    """Each worker's devices, one per rank: [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]] for 2
    workers of size 2. InvalidRequestError names the argument and the fix."""
    T, N = tensor_parallel_size, workers
    if not device.startswith("cuda"):
        if gpus is not None:
            raise InvalidRequestError(
                "gpus", f"chooses GPUs: use it with device='cuda', not {device!r}"
            )
        return [[device] * T for _ in range(N)]
    if device != "cuda":  # cuda:K, one GPU
        if gpus is not None or N * T > 1:
            raise InvalidRequestError(
                "device",
                f"{device!r} names one GPU but {N} worker(s) x tensor_parallel_size {T} need "
                f"{N * T}: use device='cuda' (with gpus=[...] to choose them)",
            )
        return [[device]]
    if gpus is None:
        if visible is None:
            if N * T > 1:
                raise InvalidRequestError(
                    "gpus",
                    f"cannot count the GPUs here (no CUDA_VISIBLE_DEVICES, no nvidia-smi) for "
                    f"{N} worker(s) x tensor_parallel_size {T}: list them, gpus=[0, 1, ...]",
                )
            visible = 1
        gpus = list(range(visible))
        source = f"{visible} GPU(s) are visible"
    else:
        if len(set(gpus)) != len(gpus) or any(
            isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in gpus
        ):
            raise InvalidRequestError("gpus", f"{gpus!r}: give distinct GPU numbers >= 0")
        if visible is not None and gpus and max(gpus) >= visible:
            raise InvalidRequestError(
                "gpus", f"{gpus!r} names GPU {max(gpus)} but only {visible} are visible (0..)"
            )
        source = f"gpus lists {len(gpus)}"
    if len(gpus) < N * T:
        raise InvalidRequestError(
            "workers",
            f"{N} worker(s) x tensor_parallel_size {T} need {N * T} GPUs but {source}: use fewer "
            "workers, a smaller tensor_parallel_size, or more GPUs",
        )
    return [[f"cuda:{g}" for g in gpus[i * T : (i + 1) * T]] for i in range(N)]


def device_flags(devices: list[str]) -> list[str]:
    """The dinfer-worker flags for one worker's devices."""
    if len(devices) > 1 and devices[0].startswith("cuda:"):
        return ["--device", "cuda", "--gpus", ",".join(d.split(":", 1)[1] for d in devices)]
    return ["--device", devices[0]]

"""Load a local Hugging Face model directory: config.json, safetensors (single or sharded).

The model is built on the `meta` device and each tensor is read straight from its shard onto the
target device and cast once, so loading holds about one copy of the weights. Under tensor
parallel (`tensor_parallel=`) each rank reads only the part of each tensor it keeps (the rules:
workers/parallel/shard.py), so it holds its shard and never the full weights.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from workers.errors import ModelConfigError, ModelLoadError
from workers.known_fields import fill_known_fields
from workers.models import FAMILIES, family_name

if TYPE_CHECKING:
    from workers.parallel.group import TensorParallel
    from workers.parallel.shard import Keep

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not path.is_dir():
        raise ModelLoadError(
            f"model directory {str(path)!r} does not exist (pass a local Hugging Face directory "
            "or a Hugging Face id such as GSAI-ML/LLaDA-8B-Instruct)"
        )
    if not file.is_file():
        raise ModelLoadError(f"{file}: missing; a model directory needs config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{file}: not valid JSON ({e})") from e


def shard_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{path / INDEX}: unreadable or without 'weight_map' ({e})") from e
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ModelLoadError(f"{shard}: missing; {INDEX} lists it")
        return files
    if (path / SINGLE).is_file():
        with safe_open(path / SINGLE, framework="pt") as f:
            return dict.fromkeys(f.keys(), path / SINGLE)
    raise ModelLoadError(
        f"{path}: no {SINGLE} or {INDEX}; the weights must be in safetensors format"
    )


class Reader:
    """Checkpoint tensors by name from their safetensors files (kept open while loading), on
    the target device and dtype: the whole tensor, or the part a Keep names; a part is copied
    out of the memory-mapped file range by range, so only its bytes are read."""

    def __init__(self, files: dict[str, Path], device, dtype: torch.dtype, stack: ExitStack):
        self.files, self.device, self.dtype = files, torch.device(device), dtype
        self.handles = {
            file: stack.enter_context(safe_open(file, framework="pt"))
            for file in sorted(set(files.values()))
        }

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape (from the file's header: nothing read)."""
        return tuple(self.handles[self.files[name]].get_slice(name).get_shape())

    def __call__(self, name: str, keep: Keep) -> torch.Tensor:
        handle = self.handles[self.files[name]]
        if keep.ranges is None:
            return handle.get_tensor(name).to(self.device).to(self.dtype)
        part = handle.get_slice(name)
        out = torch.empty(keep.shape(part.get_shape()), dtype=self.dtype, device=self.device)
        at = 0
        for lo, hi in keep.ranges:
            index = (slice(None),) * keep.dim + (slice(lo, hi),)
            out.narrow(keep.dim, at, hi - lo).copy_(part[index])
            at += hi - lo
        return out


def load_model(
    path: str | Path,
    device="cpu",
    dtype="float32",
    tensor_parallel: TensorParallel | None = None,
    expert_parallel: bool | str = False,
):
    """Build the model that config.json's `model_type` names and fill it from the shards.

    tensor_parallel: this rank's handle (workers.parallel.group.join); the result is then the
    rank's TensorParallelModel (workers.parallel.shard.shard_model), filled by reading only the
    slices it keeps; with expert_parallel the routed experts of other ranks are never read."""
    path = Path(path)
    raw = read_config(path)
    model_type = family_name(raw)
    if model_type is None:
        raise ModelConfigError(
            f"config.json: model_type={raw.get('model_type')!r} is not supported; "
            f"supported: {sorted(FAMILIES)}"
        )
    if tensor_parallel is not None:
        from workers.parallel.shard import ep_dispatch

        ep_dispatch(expert_parallel)  # a bad value fails before anything is read
    config_cls, model_cls = FAMILIES[model_type]
    config = config_cls.from_dict(fill_known_fields(raw, model_type))
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = model_cls(config)
    expected = dict(model.named_parameters())
    files = shard_files(path)
    missing = sorted(set(expected) - set(files))
    if missing:
        raise ModelLoadError(
            f"{path}: tensors missing from the checkpoint: "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    unexpected = sorted(n for n in files if n not in expected)
    if unexpected:
        raise ModelLoadError(
            f"{path}: unknown tensors for model_type {model_type!r}: {unexpected[:8]}"
        )
    with ExitStack() as stack:
        reader = Reader(files, device, dtype, stack)
        _check_shapes(reader, expected)
        if tensor_parallel is not None:
            from workers.parallel.shard import shard_model

            sharded = shard_model(model, tensor_parallel, expert_parallel, source=reader)
            left = [n for n, p in sharded.named_parameters() if p.is_meta]
            if left:  # a rule in workers/parallel/shard.py skipped them: a bug, never a model's
                raise ModelLoadError(f"{path}: shard-only loading left {left[:4]} unread")
            return sharded.eval().requires_grad_(False)
        from workers.parallel.shard import WHOLE

        for name in expected:
            _set_parameter(model, name, reader(name, WHOLE))
    model.eval().requires_grad_(False)
    return model


def _check_shapes(reader: Reader, expected: dict[str, torch.nn.Parameter]) -> None:
    """Every tensor where the index says and of the shape config.json implies (headers only)."""
    by_file: dict[Path, list[str]] = {}
    for name, file in reader.files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        present = set(reader.handles[file].keys())
        for name in names:
            if name not in present:
                raise ModelLoadError(
                    f"{file.name}: tensor {name!r} is not in this shard, though {INDEX} says it is"
                )
            got, want = reader.shape(name), tuple(expected[name].shape)
            if got != want:
                raise ModelLoadError(
                    f"{file.name}: tensor {name!r} has shape {got}, config.json implies {want}"
                )


def _set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def save_model(
    model: torch.nn.Module,
    path: str | Path,
    config: dict,
    max_shard_bytes: int | None = None,
    dtype=None,
) -> None:
    """Write config.json and the weights in the upstream layout (sharded above max_shard_bytes)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [path / SINGLE, path / INDEX, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # a leftover index would otherwise win over new weights
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {
        n: (p.detach().to(dtype) if dtype else p.detach()).contiguous().cpu()
        for n, p in model.named_parameters()
    }
    if max_shard_bytes is None:
        save_file(tensors, path / SINGLE, metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )

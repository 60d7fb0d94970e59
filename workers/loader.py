"""Load a local Hugging Face model directory: config.json, safetensors (single or sharded).

The model is built on the `meta` device and each tensor is read straight from its shard onto the
target device and cast once, so loading holds about one copy of the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from workers.errors import ModelConfigError, ModelLoadError
from workers.known_fields import fill_known_fields
from workers.models import FAMILIES, family_name

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


def load_model(path: str | Path, device="cpu", dtype="float32"):
    """Build the model that config.json's `model_type` names and fill it from the shards."""
    path = Path(path)
    raw = read_config(path)
    model_type = family_name(raw)
    if model_type is None:
        raise ModelConfigError(
            f"config.json: model_type={raw.get('model_type')!r} is not supported; "
            f"supported: {sorted(FAMILIES)}"
        )
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
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ModelLoadError(
                        f"{file.name}: tensor {name!r} is not in this shard, "
                        f"though {INDEX} says it is"
                    )
                tensor = f.get_tensor(name)
                want = tuple(expected[name].shape)
                if tuple(tensor.shape) != want:
                    raise ModelLoadError(
                        f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"config.json implies {want}"
                    )
                _set_parameter(model, name, tensor.to(dtype))
    model.eval().requires_grad_(False)
    return model


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

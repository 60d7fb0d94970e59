"""workers.loader: save/load round trips and the error raised for each kind of broken directory.

Round trips compare bit for bit (torch.equal), since loading is only a copy plus one cast.
Broken checkpoints are written by hand with safetensors.torch.save_file, so the error tests do
not depend on save_model being correct.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.tiny_models import left_padded_batch
from workers.errors import ModelConfigError, ModelLoadError
from workers.loader import load_model, save_model

INDEX = "model.safetensors.index.json"
LM_HEAD = "model.transformer.ff_out.weight"


def sample_inputs(raw: dict, seed: int = 0):
    """Two rows of 7 tokens, the second left-padded by 2, with matching positions and key mask."""
    return left_padded_batch(raw, [7, 5], seed)


def tensors_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters()}


def write_checkpoint(path, raw: dict, tensors: dict[str, torch.Tensor]):
    """A model directory written without save_model: config.json plus one model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.fixture
def good(tmp_path, raw_config, make_model):
    """(directory, raw config, tensors) of a valid float32 checkpoint; tests break one thing."""
    raw = raw_config()
    tensors = tensors_of(make_model(raw, seed=1, dtype=torch.float32))
    return write_checkpoint(tmp_path / "ckpt", raw, tensors), raw, tensors


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("weight_tying", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_round_trip_is_bit_exact(tmp_path, raw_config, make_model, sharded, weight_tying):
    """save_model then load_model reproduces every parameter and the logits exactly, in float32
    and float64, sharded or not, with or without a tied lm head."""
    raw = raw_config(weight_tying=weight_tying)
    model = make_model(raw, seed=2, dtype=torch.float32)
    save_model(model, tmp_path, raw, max_shard_bytes=16_000 if sharded else None)

    written = {}
    if sharded:
        index = json.loads((tmp_path / INDEX).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 3
        assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == shards
        assert not (tmp_path / "model.safetensors").exists()
        written = index["weight_map"]
    else:
        assert not (tmp_path / INDEX).exists()
        with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
            written = dict.fromkeys(f.keys(), "model.safetensors")
    assert set(written) == set(dict(model.named_parameters()))
    assert (LM_HEAD in written) is not weight_tying

    ids, positions, key_mask = sample_inputs(raw)
    for dtype_name, dtype in [("float32", torch.float32), ("float64", torch.float64)]:
        want_model = copy.deepcopy(model).to(dtype)
        loaded = load_model(tmp_path, dtype=dtype_name)
        assert loaded.config.weight_tying is weight_tying
        got_params = dict(loaded.named_parameters())
        for name, p in want_model.named_parameters():
            assert got_params[name].dtype == dtype
            assert torch.equal(got_params[name], p), name
        assert torch.equal(loaded(ids, positions, key_mask), want_model(ids, positions, key_mask))


def test_loaded_model_is_frozen_and_in_eval_mode(good):
    """Inference-only: no parameter asks for gradients and dropout-style layers are off."""
    path, _, _ = good
    model = load_model(path)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_bfloat16_checkpoint_loads_as_bfloat16(tmp_path, raw_config, make_model):
    """A checkpoint saved in bf16 is stored as bf16 and loads, with dtype='bfloat16', into bf16
    parameters equal to the saved values (the rounding happens once, at save time)."""
    raw = raw_config()
    model = make_model(raw, seed=3, dtype=torch.float32)
    save_model(model, tmp_path, raw, dtype=torch.bfloat16)

    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        stored = {name: f.get_tensor(name) for name in list(f.keys())}
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}

    loaded = load_model(tmp_path, dtype="bfloat16")
    params = dict(loaded.named_parameters())
    assert set(params) == set(stored)
    for name, p in params.items():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, stored[name]), name
        assert torch.equal(p, dict(model.named_parameters())[name].to(torch.bfloat16)), name
    ids, positions, key_mask = sample_inputs(raw)
    logits = loaded(ids, positions, key_mask)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ---------------------------------------------------------------- broken directories


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "no-such-model")


def test_missing_config_json(good):
    path, _, _ = good
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json: missing"):
        load_model(path)


def test_config_json_not_json(good):
    path, _, _ = good
    (path / "config.json").write_text('{"model_type": "llada",')
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        load_model(path)


def test_unknown_model_type_lists_supported_ones(good):
    path, raw, _ = good
    (path / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    with pytest.raises(ModelConfigError, match=r"model_type='gpt2' is not supported.*'llada'"):
        load_model(path)


def test_missing_mask_token_id(good):
    """Diffusion decoding cannot run without the mask token, so its absence is a config error."""
    path, raw, _ = good
    del raw["mask_token_id"]
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match="mask_token_id"):
        load_model(path)


def test_config_errors_are_value_errors(good):
    """ModelConfigError is also a ValueError, so callers catching ValueError see config errors."""
    path, raw, _ = good
    (path / "config.json").write_text(json.dumps({**raw, "model_type": "mamba"}))
    with pytest.raises(ValueError):
        load_model(path)


def test_no_safetensors_files(good):
    path, _, _ = good
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not supported")
    with pytest.raises(ModelLoadError, match="safetensors format"):
        load_model(path)


def test_shard_listed_in_index_is_missing(tmp_path, raw_config, make_model):
    raw = raw_config()
    save_model(make_model(raw, dtype=torch.float32), tmp_path, raw, max_shard_bytes=16_000)
    shard = sorted(json.loads((tmp_path / INDEX).read_text())["weight_map"].values())[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(ModelLoadError, match=re.escape(shard) + ": missing"):
        load_model(tmp_path)


def test_missing_tensor_is_named(good):
    path, raw, tensors = good
    name = "model.transformer.blocks.1.up_proj.weight"
    del tensors[name]
    write_checkpoint(path, raw, tensors)
    with pytest.raises(ModelLoadError, match="missing.*" + re.escape(name)):
        load_model(path)


def test_lm_head_missing_when_not_tied(good):
    """With weight_tying false the lm head is a tensor of its own; it may not fall back to wte."""
    path, raw, tensors = good
    del tensors[LM_HEAD]
    write_checkpoint(path, raw, tensors)
    with pytest.raises(ModelLoadError, match=re.escape(LM_HEAD)):
        load_model(path)


def test_unknown_extra_tensor_is_named(good):
    path, raw, tensors = good
    tensors["model.transformer.blocks.0.q_proj.bias"] = torch.zeros(raw["d_model"])
    write_checkpoint(path, raw, tensors)
    with pytest.raises(
        ModelLoadError, match=r"unknown tensors.*model\.transformer\.blocks\.0\.q_proj\.bias"
    ):
        load_model(path)


def test_untied_head_in_a_tied_checkpoint_is_unknown(good):
    """config says weight_tying but the file carries a separate head: loading it silently would
    drop weights the checkpoint's author meant to use."""
    path, raw, tensors = good
    write_checkpoint(path, {**raw, "weight_tying": True}, tensors)
    with pytest.raises(ModelLoadError, match=re.escape(LM_HEAD)):
        load_model(path)


def test_wrong_shape_names_the_tensor(good):
    path, raw, tensors = good
    name = "model.transformer.blocks.1.k_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 8, raw["d_model"])
    write_checkpoint(path, raw, tensors)
    with pytest.raises(ModelLoadError, match=re.escape(repr(name)) + r" has shape \(24, 48\)"):
        load_model(path)


def test_unsupported_dtype_is_named(good):
    path, _, _ = good
    with pytest.raises(ValueError, match="int8"):
        load_model(path, dtype="int8")


# ---------------------------------------------------------------- known ids of released families


def test_table_fills_a_released_family_missing_mask_and_eos(caplog):
    """LLaDA-MoE and LLaDA2 ship without these ids; the table fills them, with an info line."""
    from tests.tiny_models import tiny_family_raw
    from workers.known_fields import fill_known_fields
    from workers.models import FAMILIES

    for family in ("lladamoe", "llada2_moe"):
        raw = tiny_family_raw(family, vocab_size=157184)  # the released vocabulary size
        del raw["mask_token_id"], raw["eos_token_id"]
        with pytest.raises(ModelConfigError, match="mask_token_id"):
            FAMILIES[family][0].from_dict(raw)  # what the user would meet without the table
        caplog.clear()
        with caplog.at_level("INFO", logger="workers.known_fields"):
            config = FAMILIES[family][0].from_dict(fill_known_fields(raw, family))
        assert (config.mask_token_id, config.eos_token_id) == (156895, 156892)
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert "mask_token_id" in logged and "156895" in logged and "eos_token_id" in logged


def test_table_never_overrides_a_field_nor_fills_an_id_outside_the_vocabulary():
    from tests.tiny_models import tiny_family_raw
    from workers.known_fields import fill_known_fields

    raw = tiny_family_raw("lladamoe", vocab_size=157184, mask_token_id=7)
    assert fill_known_fields(raw, "lladamoe")["mask_token_id"] == 7
    small = tiny_family_raw("lladamoe")  # vocabulary 16: 156895 is not one of its ids
    del small["mask_token_id"]
    assert "mask_token_id" not in fill_known_fields(small, "lladamoe")
    assert fill_known_fields(raw, "gpt2") == raw


def test_load_model_fills_a_missing_mask_token_id_from_the_table(good, monkeypatch):
    """The loader applies the table: a checkpoint without mask_token_id loads with the family's."""
    from workers import known_fields

    path, raw, _ = good
    mask = raw["mask_token_id"]
    del raw["mask_token_id"]
    (path / "config.json").write_text(json.dumps(raw))
    table = {"llada": {"mask_token_id": (mask, "the test's id")}}
    monkeypatch.setattr(known_fields, "KNOWN_FIELDS", table)
    assert load_model(path).config.mask_token_id == mask

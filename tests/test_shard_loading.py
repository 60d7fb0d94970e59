"""Shard-only loading (workers.loader.load_model with tensor_parallel): two gloo ranks load each
family's tiny float64 checkpoint through Engine.from_pretrained(tensor_parallel_size=2); the
tokens equal one process's, the parameters equal shard_model's in-memory slicing of the full
model, and a recording safetensors reader shows what each rank read: every sharded tensor as
exactly 1/T of its elements (never whole), replicated ones (norms, routers) whole, the routed
experts of the other rank never.

One launch runs every case (starting processes costs more than the cases).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from dinfer_async import SamplingParams
from tests.ranks import report, run_ranks
from tests.tiny_models import (
    IdTokenizer,
    random_model,
    random_prompts,
    tiny_family_raw,
    tiny_raw_config,
)
from workers.engine import Engine
from workers.loader import load_model, save_model
from workers.parallel.layers import split

SIZE = 2
# name -> (config.json, seed, expert_parallel, max_shard_bytes: several files and an index)
MODELS = {
    "llada": (tiny_family_raw("llada"), 3, False, None),
    # one key/value head for two ranks (replicated), a tied embedding padded past the vocabulary
    "llada_kv1_tied": (
        tiny_raw_config(
            n_kv_heads=1, vocab_size=13, embedding_size=16, mask_token_id=12, weight_tying=True
        ),
        5,
        False,
        None,
    ),
    "lladamoe_ep": (
        tiny_family_raw("lladamoe", moe_layer_freq=[0, 1], shared_expert_intermediate_size=10),
        4,
        True,
        20_000,
    ),
    "llada2_moe_ep": (tiny_family_raw("llada2_moe"), 3, True, 30_000),
    "Dream": (tiny_family_raw("Dream"), 3, False, None),
}
STRICT = ("llada", "lladamoe_ep", "llada2_moe_ep", "Dream")  # every split exactly 1/T
COMMON = dict(gen_length=16, early_stop=False)
PARAMS = {
    "threshold-dual-greedy": dict(decoder="threshold", threshold=0.7, cache="dual", block_length=8),
    "fixed-none-sampled": dict(
        decoder="fixed", cache="none", block_length=8, steps=8, temperature=0.8
    ),
}


def run_case(engine: Engine, case: str) -> list[list[int]]:
    vocab, mask = engine.config.vocab_size, engine.config.mask_token_id
    prompts: list[list[int] | str] = list(random_prompts(11, [6, 1, 9], vocab, mask))
    params = [SamplingParams(**COMMON, **PARAMS[case], seed=s) for s in (1, 2, 3)]
    return [r.token_ids for r in engine.generate(prompts, params)]


def full_model(name: str) -> torch.nn.Module:
    raw, seed, _, _ = MODELS[name]
    return random_model(raw, seed=seed, std=0.4)


class RecordingSlice:
    def __init__(self, inner, name: str, log: list):
        self.inner, self.name, self.log = inner, name, log

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        out = self.inner[index]
        self.log.append([self.name, "slice", int(out.numel())])
        return out


class RecordingFile:
    """safetensors.safe_open that logs every tensor read: (name, whole or slice, elements)."""

    def __init__(self, log: list, *args, **kwargs):
        from safetensors import safe_open

        self.inner, self.log = safe_open(*args, **kwargs), log

    def __enter__(self):
        self.file = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_tensor(self, name: str):
        out = self.file.get_tensor(name)
        self.log.append([name, "whole", int(out.numel())])
        return out

    def get_slice(self, name: str):
        return RecordingSlice(self.file.get_slice(name), name, self.log)


def _rank(rank: int, size: int, root: str) -> None:
    import workers.engine
    import workers.loader
    from workers.parallel.group import join
    from workers.parallel.shard import shard_model

    workers.engine.load_tokenizer = lambda path: IdTokenizer()  # type: ignore[assignment]
    results: dict[str, object] = {}
    for name, (_, _, ep, _) in MODELS.items():
        log: list = []
        workers.loader.safe_open = functools.partial(RecordingFile, log)  # type: ignore
        engine = Engine.from_pretrained(
            Path(root, name), dtype="float64", tensor_parallel_size=size, expert_parallel=ep
        )
        results[f"{name}/reads"] = list(log)
        for case in PARAMS:
            results[f"{name}/{case}"] = run_case(engine, case)
        reference = dict(shard_model(full_model(name), join(size), ep).named_parameters())
        loaded = dict(engine.model.named_parameters())
        results[f"{name}/same parameters"] = sorted(reference) == sorted(loaded) and all(
            torch.equal(p, reference[n]) and p.dtype == torch.float64 for n, p in loaded.items()
        )
    report(root, rank, results)


@pytest.fixture(scope="module")
def parallel(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("shard-load")
    for name, (raw, _, _, shard_bytes) in MODELS.items():
        save_model(full_model(name), root / name, raw, max_shard_bytes=shard_bytes)
    return root, run_ranks(_rank, SIZE, root)


CASES = [(m, c) for m in MODELS for c in PARAMS]


@pytest.mark.parametrize(("model", "case"), CASES, ids=[f"{m}/{c}" for m, c in CASES])
def test_shard_loaded_tokens_equal_one_process(parallel, model, case):
    root, ranks = parallel
    single = run_case(Engine(load_model(root / model, dtype="float64"), IdTokenizer()), case)
    assert any(single), "the case must generate something to compare"
    for rank in range(SIZE):
        assert ranks[rank][f"{model}/{case}"] == single, f"rank {rank}"


@pytest.mark.parametrize("model", list(MODELS))
def test_shard_loaded_parameters_equal_in_memory_sharding(parallel, model):
    for rank in range(SIZE):
        assert parallel[1][rank][f"{model}/same parameters"], f"rank {rank}"


def _replicated(name: str) -> bool:
    """Norms and routers: every rank holds them whole (the test's own list, not shard.py's)."""
    return "norm" in name or "ln_f" in name or name.endswith(("mlp.gate.weight", "expert_bias"))


@pytest.mark.parametrize("model", STRICT)
def test_a_rank_reads_only_its_slices(parallel, model):
    _, ranks = parallel
    full = {n: p.numel() for n, p in full_model(model).named_parameters()}
    ep, experts = MODELS[model][2], MODELS[model][0]["num_experts"] if "ep" in model else 0
    for rank in range(SIZE):
        read: dict[str, int] = dict.fromkeys(full, 0)
        whole: set[str] = set()
        for name, how, n in ranks[rank][f"{model}/reads"]:
            read[name] += n
            if how == "whole":
                whole.add(name)
        assert sum(read.values()) < sum(full.values()), "a rank reads less than the checkpoint"
        for name, n in full.items():
            expert = re.search(r"\.experts\.(\d+)\.", name)
            if expert and ep:
                lo, hi = split(experts, SIZE, rank)
                owned = lo <= int(expert.group(1)) < hi
                assert read[name] == (n if owned else 0), (rank, name)  # others' never read
            elif expert or _replicated(name):
                assert read[name] == n and name in whole, (rank, name)
            else:
                assert read[name] * SIZE == n and name not in whole, (rank, name, read[name], n)


def test_keep_names_the_part_a_rank_holds():
    from workers.parallel.shard import WHOLE, Keep

    full = torch.arange(24.0).view(4, 6)
    assert WHOLE.take(full) is full and WHOLE.shape((4, 6)) == (4, 6)
    rows = Keep(0, ((0, 1), (2, 4)))  # LLaDA2's fused q | k | v rows: several ranges
    assert rows.shape((4, 6)) == (3, 6)
    assert torch.equal(rows.take(full), full[[0, 2, 3]])
    columns = Keep(1, ((3, 6),))
    assert torch.equal(columns.take(full), full[:, 3:]) and columns.take(full).is_contiguous()


def test_a_sharded_model_is_not_sharded_again_differently(tmp_path):
    from workers.parallel.group import TensorParallel, set_current
    from workers.parallel.shard import shard_model

    raw = MODELS["lladamoe_ep"][0]
    save_model(full_model("lladamoe_ep"), tmp_path, raw)
    one = TensorParallel(None, 0, 1)  # type: ignore[arg-type]  # no collective while loading
    try:
        sharded = load_model(tmp_path, dtype="float64", tensor_parallel=one)
        assert shard_model(sharded, one) is sharded
        with pytest.raises(ValueError, match="sharded for rank 0 of 1, not rank 0 of"):
            shard_model(sharded, TensorParallel(None, 0, 2))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="expert_parallel=None, not True"):
            shard_model(sharded, one, expert_parallel=True)
        with pytest.raises(ValueError, match="expert_parallel='scatter'"):
            load_model(tmp_path, tensor_parallel=one, expert_parallel="scatter")
    finally:
        set_current(None)  # the sampler of later tests in this process must see no group


@pytest.mark.parametrize("model", ["llada2_moe_ep", "llada_kv1_tied"])
def test_shard_loading_casts_like_loading_whole(tmp_path, model):
    """A bf16 checkpoint read into float64 slice by slice equals the whole model read into
    float64 and then sharded, for both ranks of 2 (built in this process: building a shard
    needs no collective) and the all-to-all dispatch (its shared expert whole on every rank)."""
    from workers.parallel.group import TensorParallel, set_current
    from workers.parallel.shard import shard_model

    raw, _, ep, _ = MODELS[model]
    save_model(full_model(model), tmp_path, raw, dtype=torch.bfloat16)
    dispatch = "all_to_all" if ep else False
    try:
        for rank in range(SIZE):
            tp = TensorParallel(None, rank, SIZE)  # type: ignore[arg-type]
            whole = load_model(tmp_path, dtype="float64")
            reference = dict(shard_model(whole, tp, dispatch).named_parameters())
            loaded = load_model(
                tmp_path, dtype="float64", tensor_parallel=tp, expert_parallel=dispatch
            )
            params = dict(loaded.named_parameters())
            assert sorted(params) == sorted(reference)
            for name, p in params.items():
                assert p.dtype == torch.float64 and torch.equal(p, reference[name]), (rank, name)
    finally:
        set_current(None)

"""Issue 16's acceptance through real processes: for every family's tiny model (saved as a model
directory with the bundled tokenizer), one `dinfer-batch --tensor-parallel-size 2 --dtype float64`
run (expert parallel too for the MoE families, and LLaDA-MoE once tensor-parallel only) whose
lines carry their own decoder and cache (fixed and threshold x dual and vicinity; LLaDA2 runs dual
as its block-causal cache) gives, line for line, the token ids of one in-process Engine on the same
directory. dinfer-batch serves through the Client, so this covers the Client's group too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dinfer_async import SamplingParams

ROOT = Path(__file__).resolve().parent.parent

# The bundled tokenizer's ids: 263 in all, EOS 257, the mask 262.
IDS = dict(vocab_size=263, mask_token_id=262, eos_token_id=257)
RAW = {
    "llada": dict(IDS, embedding_size=264),
    "lladamoe": dict(IDS, max_position_embeddings=256),
    "llada2_moe": dict(IDS, pad_token_id=257),
    "Dream": dict(IDS, bos_token_id=257, pad_token_id=257),
}
MOE = ("lladamoe", "llada2_moe")

PROMPTS = ["add 017+025=", "sort 5 1 4 2 3 =", "reverse stone =", "copy dream lunar ="]
# One line each: fixed and threshold decoders x dual and vicinity caches, greedy and sampled.
LINES = [
    dict(decoder="fixed", cache="dual", block_length=4, steps=16, temperature=0.8),
    dict(decoder="fixed", cache="vicinity", block_length=8, steps=8),
    dict(decoder="threshold", threshold=0.7, cache="dual", block_length=8),
    dict(decoder="threshold", threshold=0.6, cache="vicinity", block_length=8, temperature=0.9),
]
COMMON = dict(gen_length=16, early_stop=False)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each family's random tiny model with the bundled model's tokenizer."""
    from tests.tiny_models import random_model, tiny_family_raw
    from workers.bundled import MODEL_DIR
    from workers.loader import save_model

    dirs = {}
    for family, overrides in RAW.items():
        path = tmp_path_factory.mktemp(family)
        raw = tiny_family_raw(family, **overrides)
        model = random_model(raw, seed=3, std=0.4)
        raw.pop("rope_scaling", None)  # null anyway; transformers' tokenizer loader warns
        save_model(model, path, raw)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(MODEL_DIR, name), path / name)
        dirs[family] = path
    return dirs


def one_process(model: Path) -> list[list[int]]:
    """The answers of one in-process Engine to LINES."""
    from workers.engine import Engine

    engine = Engine.from_pretrained(model, dtype="float64")
    params = [SamplingParams(**COMMON, **p, seed=i + 1) for i, p in enumerate(LINES)]
    return [r.token_ids for r in engine.generate(list(PROMPTS), params)]


def batch_run(model: Path, tmp: Path, expert_parallel: bool | str) -> list[list[int]]:
    """dinfer-batch with a group of 2 ranks; the token ids of each line, in input order."""
    src, dst = tmp / "in.jsonl", tmp / "out.jsonl"
    lines = [
        {"id": str(i), "prompt": p, **COMMON, **q, "seed": i + 1}
        for i, (p, q) in enumerate(zip(PROMPTS, LINES))
    ]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    flags = ["--model", str(model), "--dtype", "float64", "--tensor-parallel-size", "2"]
    if expert_parallel:
        flags += ["--enable-expert-parallel", "--expert-parallel-dispatch", expert_parallel]
    proc = subprocess.run(
        [sys.executable, "-m", "dinfer_async.batch", str(src), str(dst), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 worker ready in" in proc.stderr and "worker 0 on cpu,cpu" in proc.stderr
    split = f"(cpu, cpu; experts split over the ranks, {expert_parallel})"  # the worker's line
    assert (split in proc.stderr) == bool(expert_parallel), proc.stderr
    records = {r["id"]: r for r in map(json.loads, dst.read_text().splitlines())}
    assert sorted(records) == [str(i) for i in range(len(LINES))], records
    return [records[str(i)]["token_ids"] for i in range(len(LINES))]


# the MoE families with each expert dispatch, and LLaDA-MoE with its experts replicated
DISPATCH = {"lladamoe": "all_reduce", "llada2": "all_to_all"}
RUNS = [(family, DISPATCH.get(family, False)) for family in RAW] + [("lladamoe", False)]


@pytest.mark.parametrize(
    ("family", "expert_parallel"), RUNS, ids=[f"{f}-{e or 'tp'}" for f, e in RUNS]
)
def test_dinfer_batch_group_equals_one_process(model_dirs, tmp_path, family, expert_parallel):
    want = one_process(model_dirs[family])
    assert sum(len(t) > 3 for t in want) >= 3, "the comparison needs real answers"
    assert batch_run(model_dirs[family], tmp_path, expert_parallel) == want

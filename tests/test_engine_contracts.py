"""The engine's module contracts: one list of names, registries keyed by them, which module may
import which, how a cache policy is chosen for block-causal models, and who owns a policy's
per-request state."""

import ast
from pathlib import Path

import pytest

from dinfer_async import SamplingParams, params
from tests.tiny_models import random_prompts, tiny_model
from workers.cache import (
    CACHE_POLICIES,
    BlockCausalCache,
    NoCache,
    VicinityCache,
    policy_class,
)
from workers.decoders import DECODERS
from workers.models import FAMILIES
from workers.scheduler import Scheduler, group_key

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ["iteration", "decoders", "scheduler", "cache", "kv_cache", "engine", "sampling"]
MASK = 11


def test_registries_are_keyed_by_the_names_users_see():
    """dinfer_async.params lists the names (validation, CLI choices, benchmarks read them); the
    workers' registries must hold exactly those, in the same order."""
    assert tuple(DECODERS) == params.DECODERS
    assert tuple(CACHE_POLICIES) == params.CACHES


def imports(module: str) -> set[str]:
    """Every module `workers/<module>.py` imports, at run time or for type checking."""
    tree = ast.parse((ROOT / "workers" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("module", ENGINE + ["shared"])
def test_the_engine_imports_neither_the_oracle_nor_a_family(module):
    # a family's own module, or the package that imports them all
    family_modules = {cls.__module__ for pair in FAMILIES.values() for cls in pair}
    assert "workers.models.llada2" in family_modules
    forbidden = family_modules | {"workers.reference", "workers.models"}
    bad = imports(module) & forbidden
    assert not bad, f"workers/{module}.py imports {bad}"


def test_the_oracle_depends_on_shared_pieces_only():
    """The reference sampler uses the shared pieces (and the model's protocol, for its type)."""
    ours = {m for m in imports("reference") if m.startswith("workers")}
    neutral = ("workers.shared", "workers.interfaces")
    assert ours and all(m.startswith(neutral) for m in ours), ours


def test_block_causal_models_resolve_policies_explicitly():
    """Each policy declares whether it handles block-causal models; the registry maps the others
    to BlockCausalCache (the same tokens as no cache: tests/test_engine_families.py)."""
    for name, cls in CACHE_POLICIES.items():
        assert isinstance(cls.block_causal, bool), name
        assert policy_class(name, block_causal=False) is cls
        expected = cls if cls.block_causal else BlockCausalCache
        assert policy_class(name, block_causal=True) is expected
    assert policy_class("none", True) is NoCache
    assert {policy_class(n, True) for n in ("prefix", "dual", "vicinity")} == {BlockCausalCache}


def test_the_group_key_comes_from_the_policy():
    """Vicinity's look-arounds split groups; other policies ignore them."""
    a = SamplingParams(cache="vicinity", prefix_look=4)
    b = SamplingParams(cache="vicinity", prefix_look=8)
    assert VicinityCache.group_key(a) == (4, 16)
    assert group_key(a, False) != group_key(b, False)
    dual_a = SamplingParams(cache="dual", prefix_look=4)
    dual_b = SamplingParams(cache="dual", prefix_look=8)
    assert group_key(dual_a, False) == group_key(dual_b, False)
    assert group_key(dual_a, False) != group_key(SamplingParams(cache="prefix"), False)
    assert group_key(dual_a, False) != group_key(
        SamplingParams(cache="dual", block_length=8), False
    )


def block_causal_tiny():
    model = tiny_model(7, vocab_size=12, embedding_size=16, mask_token_id=MASK)
    model.__class__ = type("BlockCausalTiny", (type(model),), {"block_causal": True})
    return model


def test_a_policy_owns_and_frees_its_per_request_state():
    """The block-causal cache keeps each request's keys between rounds in the policy (not on the
    request); when a request finishes or is aborted the policy forgets it, and an empty group
    takes its policy with it."""
    model = block_causal_tiny()
    p = SamplingParams(
        gen_length=12, block_length=4, steps=12, decoder="fixed", cache="dual", early_stop=False
    ).validate()
    sched = Scheduler(model, report=False)
    prompts = random_prompts(3, [5, 7, 6], 11, MASK)
    seqs = [sched.add(i, q, p, 0) for i, q in enumerate(prompts)]
    for _ in range(4):  # the first block (fixed: 4 steps) of every request
        sched.step()
    [policy] = sched.policies.values()
    assert isinstance(policy, BlockCausalCache)
    assert set(policy.stored) == set(seqs)
    assert not hasattr(seqs[0], "kv")
    sched.abort(seqs[1])
    sched.step()
    assert seqs[1] not in policy.stored
    while sched.has_work():
        sched.step()
    assert policy.stored == {} and sched.policies == {} and sched.running == {}
    assert seqs[0].finish_reason == "length" and seqs[1].finish_reason is None

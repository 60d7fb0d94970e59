"""Issue 15 item 2: a block's steps between host checks never sync the host with the device.

workers.nosync.forbid_host_sync makes every operation that would sync on a GPU raise (on the
CPU, where nothing really syncs); DINFER_SYNC_CHECK=1 runs each step region of each round under
it. Tokens and stats with several steps per check equal those checking every step (float64)."""

import itertools

import pytest
import torch

from dinfer_async import SamplingParams
from dinfer_kernels.options import configured
from tests.tiny_models import decoder_params, random_prompts, tiny_family_model, tiny_model
from workers import iteration
from workers.nosync import HostSyncError, forbid_host_sync
from workers.scheduler import Scheduler, StepUpdate, denoise

MASK = 39
DECODERS = ["fixed", "threshold", "factor", "hierarchical", "credit", "joint"]
CACHES = ["none", "prefix", "dual", "vicinity"]

SYNCS = {
    "item": lambda x: x[0].item(),
    "tolist": lambda x: x.tolist(),
    "bool": lambda x: bool(x[0]),
    "int": lambda x: int(x[0]),
    "float": lambda x: float(x[0]),
    "nonzero": lambda x: torch.nonzero(x),
    "method nonzero": lambda x: x.nonzero(),
    "where with one argument": lambda x: torch.where(x > 1),
    "boolean index": lambda x: x[x > 1],
    "boolean index write": lambda x: x.__setitem__(x > 1, 0),
    "masked_select": lambda x: x.masked_select(x > 1),
    "unique": lambda x: torch.unique(x),
    "cpu": lambda x: x.cpu(),
    "to cpu": lambda x: x.to("cpu"),
    "numpy": lambda x: x.numpy(),
    "upload": lambda x: torch.tensor([1, 2], device=x.device),
}


@pytest.mark.parametrize("name", sorted(SYNCS))
def test_the_guard_refuses_what_would_sync(name):
    x = torch.arange(4)
    with forbid_host_sync(), pytest.raises(HostSyncError):
        SYNCS[name](x)
    SYNCS[name](x)  # restored on exit


def test_the_guard_lets_device_work_through():
    x = torch.arange(6.0).reshape(2, 3)
    with forbid_host_sync():
        y = torch.where(x > 2, x, 0.0).sum(-1) + x.max(-1).values
        y = y.to(torch.float64)
        z = x[torch.tensor([1, 0])]
        x[:, 1] = torch.where(x[:, 0] > 0, -1.0, x[:, 1])
    assert y.tolist() == [2.0, 17.0] and z[0].tolist() == [3.0, 4.0, 5.0]


@pytest.fixture
def checked(monkeypatch):
    """DINFER_SYNC_CHECK=1, counting the step regions entered."""
    monkeypatch.setenv("DINFER_SYNC_CHECK", "1")
    regions = []
    original = iteration.step_region

    def counting(device):
        regions.append(device)
        return original(device)

    monkeypatch.setattr(iteration, "step_region", counting)
    return regions


@pytest.mark.parametrize("decoder,cache", list(itertools.product(DECODERS, CACHES)))
def test_steps_without_host_sync_give_the_same_tokens(decoder, cache, monkeypatch):
    """Every decoder x cache policy, batch 3, ragged prompts: each step runs under the guard,
    three steps per check; tokens, forwards, commits and edits as checking every step."""
    model = tiny_model(9)
    prompts = random_prompts(9, [5, 12, 2], 40, MASK)
    p = decoder_params(decoder, cache)
    want = denoise(model, prompts, p, [1, 2, 3])
    monkeypatch.setenv("DINFER_SYNC_CHECK", "1")
    got = denoise(model, prompts, p, [1, 2, 3], steps_per_check=3)
    stats = lambda s: (s.window, s.forwards, s.committed, s.edits, s.finish_reason)
    assert [stats(s) for s in got] == [stats(s) for s in want]


@pytest.mark.parametrize("family", ["Dream", "llada2_moe", "lladamoe"])
def test_other_families_step_without_host_sync(family, checked):
    model = tiny_family_model(family)
    prompts = random_prompts(4, [5, 9, 2], 15, 15)
    p = SamplingParams(gen_length=16, block_length=8, threshold=0.4, cache="dual").validate()
    want = [s.window for s in denoise(model, prompts, p, [1, 2, 3])]
    steps = len(checked)
    assert [s.window for s in denoise(model, prompts, p, [1, 2, 3], steps_per_check=2)] == want
    assert steps > 0 and len(checked) > steps, "every step ran in a step region"


def test_a_host_sync_in_a_step_is_caught(checked):
    """The routed experts' loop reads expert counts on the host: under the check it raises."""
    model = tiny_family_model("lladamoe")
    p = SamplingParams(gen_length=8, block_length=8, cache="dual").validate()
    with configured(moe="loop"), pytest.raises(HostSyncError, match="bincount|tolist"):
        denoise(model, [[3, 4, 5]], p, [0])
    assert checked, "the step ran in a step region"


def run_streaming(model, prompts, p, steps_per_check):
    sched = Scheduler(model, steps_per_check=steps_per_check)
    seqs = [sched.add(i, q, p, i) for i, q in enumerate(prompts)]
    updates: list[StepUpdate] = []
    forwards = 0
    with torch.no_grad():
        while sched.has_work():
            out = sched.step()
            forwards += 1
            updates += [u for u in out if isinstance(u, StepUpdate)]
    return seqs, updates, forwards


def test_streaming_reports_once_per_check(checked):
    """With 3 steps per check a stream gets fewer updates, each with the latest block and every
    position committed since the last one; per block they add up to the whole block."""
    model = tiny_model(5)
    prompts = random_prompts(5, [4, 7], 40, MASK)
    p = SamplingParams(
        gen_length=16, block_length=8, decoder="fixed", steps=16, cache="dual", early_stop=False
    ).validate()
    every, every_updates, _ = run_streaming(model, prompts, p, 1)
    checked.clear()
    seqs, updates, forwards = run_streaming(model, prompts, p, 3)
    assert [s.window for s in seqs] == [s.window for s in every]
    assert len(checked) == forwards == 2 * 9, "8 steps a block, checked after 3, 6 and 9"
    assert len(updates) < len(every_updates)
    for s in seqs:
        for block in range(2):
            mine = [u for u in updates if u.seq is s and u.block == block]
            committed = sorted(j for u in mine for j in u.newly_committed)
            assert committed == list(range(8)), "each position committed once, none lost"
            assert mine[-1].block_final and not any(u.block_final for u in mine[:-1])
            assert mine[-1].block_tokens == s.window[block * 8 : block * 8 + 8]
            assert len(mine) >= 2, "streaming still shows intermediate frames"


def test_steps_per_check_must_be_a_positive_integer():
    model = tiny_model(5)
    p = SamplingParams(gen_length=8, block_length=8).validate()
    for bad in (0, -1, 1.5, True):
        with pytest.raises((ValueError, TypeError), match="steps_per_check"):
            denoise(model, [[3, 4]], p, [0], steps_per_check=bad)

"""Issue 15 item 1: graph-captured block steps (workers/graphs.py).

On the CPU the static-shape step runs eagerly over its static copies ("static mode"): its
tokens, counters and streamed updates must equal the eager path's, in float64 and float32, with
the column-aligned layout (extra padding) it uses, batch > 1 and ragged prompts. The CUDA
capture itself is checked by benchmarks/run_on_gpu.sh (the graphs step) and the test at the end,
which runs only where CUDA is."""

import itertools

import pytest
import torch

from dinfer_async import SamplingParams
from dinfer_async.errors import InvalidRequestError
from tests.tiny_models import decoder_params, random_prompts, tiny_family_model, tiny_model
from workers import graphs
from workers.engine import Engine
from workers.graphs import resolve_mode
from workers.scheduler import Scheduler, StepUpdate, denoise

MASK = 39
CACHES = ["none", "prefix", "dual", "vicinity"]


def outcome(seqs):
    return [(s.window, s.forwards, s.committed, s.edits, s.finish_reason) for s in seqs]


def run(model, prompts, p, mode, steps_per_check=1, stats=None):
    return denoise(
        model,
        prompts,
        p,
        [1, 2, 3],
        steps_per_check=steps_per_check,
        cuda_graphs=mode,
        stats=stats,
    )


@pytest.mark.parametrize(
    "decoder,cache,dtype",
    [
        *itertools.product(["fixed", "threshold"], CACHES, [torch.float64, torch.float32]),
        *itertools.product(["factor", "hierarchical", "joint"], ["dual", "none"], [torch.float64]),
    ],
)
def test_static_steps_give_the_eager_tokens(decoder, cache, dtype):
    """Batch 3, ragged prompts; the static path really ran (steps_static > 0)."""
    model = tiny_model(9, dtype=dtype)
    prompts = random_prompts(9, [5, 12, 2], 40, MASK)
    p = decoder_params(decoder, cache)
    want = run(model, prompts, p, "off")
    stats: dict = {}
    got = run(model, prompts, p, "static", steps_per_check=2, stats=stats)
    assert outcome(got) == outcome(want)
    assert stats["steps_static"] > 0 and stats["steps_replayed"] == 0


def test_a_key_is_reused_across_rounds_and_steps_are_counted():
    """Blocks at nearby positions share a column-aligned layout, so one entry per step index
    serves several rounds (here all 4 blocks); padding counts still add up as without
    graphs."""
    model = tiny_model(5)
    prompts = random_prompts(5, [4, 7], 40, MASK)
    p = decoder_params("fixed", "dual", gen_length=32, temperature=0.0)
    eager_stats: dict = {}
    want = denoise(model, prompts, p, [1, 2], stats=eager_stats, cuda_graphs="off")
    sched = Scheduler(model, report=False, cuda_graphs="static")
    seqs = [sched.add(i, q, p, s) for i, (q, s) in enumerate(zip(prompts, [1, 2]))]
    with torch.no_grad():
        while sched.has_work():
            sched.step()
    assert outcome(seqs) == outcome(want)
    assert sched.graphs is not None
    assert sched.rounds == 4 and len(sched.graphs.entries) == 1, "2 steps a block, 4 blocks"
    assert sched.graphs.counts == {
        "eager": 4,
        "static": 4,
        "captured": 0,
        "replayed": 0,
        "failed": 0,
    }
    assert sched.fed_real == eager_stats["tokens_real"]
    assert graphs.COLUMNS > 1


def test_streaming_updates_match():
    model = tiny_model(5)
    prompts = random_prompts(5, [4, 7], 40, MASK)
    p = decoder_params("threshold", "dual", gen_length=16)

    def stream(mode):
        sched = Scheduler(model, steps_per_check=2, cuda_graphs=mode)
        for i, q in enumerate(prompts):
            sched.add(i, q, p, i)
        out = []
        with torch.no_grad():
            while sched.has_work():
                out += [
                    (u.seq.id, u.block, u.block_tokens, u.newly_committed, u.block_final)
                    for u in sched.step()
                    if isinstance(u, StepUpdate)
                ]
        return out

    assert stream("static") == stream("off")


def test_mixed_decoders_and_guidance_fall_back_or_match():
    """Rows with different decoders run eagerly (static again once one decoder is left);
    guided rows (cfg) go through static steps."""
    model = tiny_model(7)
    prompts = random_prompts(7, [3, 9, 6], 40, MASK)
    mixed = [
        decoder_params("threshold", "dual"),
        decoder_params("fixed", "dual"),
        decoder_params("threshold", "dual"),
    ]
    stats: dict = {}
    assert outcome(run(model, prompts, mixed, "static", stats=stats)) == outcome(
        run(model, prompts, mixed, "off")
    )
    assert stats["steps_eager"] > stats["rounds"], "not only the blocks' first steps"
    guided = decoder_params("threshold", "dual", cfg_scale=0.5)
    stats = {}
    assert outcome(run(model, prompts, guided, "static", stats=stats)) == outcome(
        run(model, prompts, guided, "off")
    )
    assert stats["steps_static"] > 0


@pytest.mark.parametrize("family", ["Dream", "llada2_moe"])
def test_other_families(family):
    """A logit shift (Dream) and a block-causal model with its stored-prefix cache (LLaDA2)."""
    model = tiny_family_model(family)
    prompts = random_prompts(4, [5, 9, 2], 15, 15)
    p = SamplingParams(gen_length=16, block_length=8, threshold=0.4, cache="dual").validate()
    assert outcome(run(model, prompts, p, "static")) == outcome(run(model, prompts, p, "off"))


def test_modes(monkeypatch):
    assert resolve_mode(True) == "on" and resolve_mode(False) == "off"
    monkeypatch.delenv("DINFER_CUDA_GRAPHS", raising=False)
    assert resolve_mode() == "off", "off unless asked for"
    monkeypatch.setenv("DINFER_CUDA_GRAPHS", "static")
    assert resolve_mode() == "static"
    monkeypatch.setenv("DINFER_CUDA_GRAPHS", "yes please")
    with pytest.raises(ValueError, match="DINFER_CUDA_GRAPHS"):
        resolve_mode()
    with pytest.raises(InvalidRequestError, match="cuda_graphs"):
        Engine(tiny_model(1), tokenizer=None, cuda_graphs="sometimes")  # type: ignore[arg-type]


def test_off_builds_no_graphs():
    sched = Scheduler(tiny_model(1), cuda_graphs=False)
    assert sched.graphs is None


class ReplayAsCaptured:
    """A CUDA graph's stand-in on a CPU: replay re-runs the step as it was captured, i.e. the
    capture-time round (its host values and step index, whatever round runs now) over the
    static copies, its results written into the tensors the capture left. A step that reads a
    tensor or host value outside its key and slots then replays stale, as a real graph would."""

    def record(self, fn) -> None:
        self.round = round = fn.__self__
        self.slots = graphs._slots(round)  # the static copies are in the attributes now
        self.host = [(obj, self._host(obj)) for _, obj in graphs._objects(round)]
        fn()
        self.out = [getattr(*owners[0]) for owners, _ in self.slots]

    @staticmethod
    def _host(obj) -> dict:
        """obj's attributes other than tensors, lists copied (row spans, decoder groups)."""
        return {
            k: list(v) if isinstance(v, list) else v
            for k, v in vars(obj).items()
            if not isinstance(v, torch.Tensor)
        }

    def replay(self) -> None:
        saved = [(obj, self._host(obj)) for obj, _ in self.host]
        tensors = [[getattr(o, n) for o, n in owners] for owners, _ in self.slots]
        for obj, host in self.host:
            vars(obj).update(host)
        for owners, static in self.slots:
            for obj, name in owners:
                setattr(obj, name, static)
        self.round.batch._count_fed = lambda *args: None
        try:
            self.round._decode()
            for (owners, _), out in zip(self.slots, self.out):
                out.copy_(getattr(*owners[0]))
        finally:
            del self.round.batch._count_fed
            for (owners, _), values in zip(self.slots, tensors):
                for (obj, name), value in zip(owners, values):
                    setattr(obj, name, value)
            for obj, host in saved:
                vars(obj).update(host)


def fake_cuda_graphs() -> graphs.StepGraphs:
    g = graphs.StepGraphs(torch.device("cpu"), "on")
    g.capture = True
    g._warm_up = lambda fn: fn()  # type: ignore[method-assign]
    g._new_graph = ReplayAsCaptured  # type: ignore[method-assign]
    g._record = lambda graph, fn: graph.record(fn)  # type: ignore[method-assign]
    return g


@pytest.mark.parametrize(
    "decoder,cache",
    [
        *itertools.product(["fixed", "threshold"], CACHES),
        ("hierarchical", "dual"),
        ("joint", "prefix"),
    ],
)
def test_replayed_steps_give_the_eager_tokens(decoder, cache):
    """The capture path with ReplayAsCaptured for the graph: calls share the graphs (and KV
    storage): a key's first step runs eagerly, its second is captured, later ones replay what
    an earlier call's round captured (each prompt set runs three times, then another set)."""
    model = tiny_model(9, dtype=torch.float32)
    g = fake_cuda_graphs()
    p = decoder_params(decoder, cache, gen_length=32)
    for seed in (0, 0, 0, 1, 1):
        prompts = random_prompts(seed, [5, 12, 2], 40, MASK)
        want = denoise(model, prompts, p, [seed, 2, 3], cuda_graphs=False)
        got = denoise(model, prompts, p, [seed, 2, 3], cuda_graphs=g)
        assert outcome(got) == outcome(want), seed
    assert g.counts["replayed"] > 0 and g.counts["captured"] > 0 and g.counts["static"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_gives_the_eager_tokens():
    model = tiny_model(9, dtype=torch.float32).cuda()
    prompts = random_prompts(9, [5, 12, 2], 40, MASK)
    for decoder, cache in itertools.product(["fixed", "threshold"], CACHES):
        p = decoder_params(decoder, cache, gen_length=32)
        stats: dict = {}
        got = run(model, prompts, p, "on", stats=stats)
        assert outcome(got) == outcome(run(model, prompts, p, "off")), (decoder, cache)
        assert stats["steps_replayed"] > 0


def test_an_engine_keeps_its_graphs_and_cache_across_calls():
    from workers.bundled import MODEL_DIR
    from workers.tokenizer import load_tokenizer

    model = tiny_model(3)
    engine = Engine(model, load_tokenizer(MODEL_DIR), cuda_graphs="static")
    p = decoder_params("fixed", "dual", temperature=0.0, seed=7)
    prompts: list = random_prompts(3, [4, 6], 40, MASK)
    first = [r.token_ids for r in engine.generate(prompts, p)]
    assert engine.graphs is not None
    entries, kv = len(engine.graphs.entries), engine.graphs.kv
    assert [r.token_ids for r in engine.generate(prompts, p)] == first
    assert len(engine.graphs.entries) == entries and engine.graphs.kv is kv
    assert engine.last_run["steps_static"] > 0
    off = Engine(model, load_tokenizer(MODEL_DIR), cuda_graphs=False)
    assert [r.token_ids for r in off.generate(prompts, p)] == first


@pytest.mark.parametrize(
    "decoder,cache", [("fixed", "dual"), ("threshold", "vicinity"), ("joint", "none")]
)
def test_a_static_step_reads_nothing_but_its_static_copies(decoder, cache):
    """The live tensors hold garbage while a static step runs: a step reading one other than
    through its static copy (which a captured graph would replay stale) changes the tokens."""
    model = tiny_model(9)
    prompts = random_prompts(9, [5, 12, 2], 40, MASK)
    p = (
        decoder_params(decoder, cache, cfg_scale=0.5)
        if cache == "dual"
        else decoder_params(decoder, cache)
    )
    want = run(model, prompts, p, "off")
    sched = Scheduler(model, report=False, cuda_graphs="static")
    assert sched.graphs is not None
    sched.graphs.poison = True
    seqs = [sched.add(i, q, p, s) for i, (q, s) in enumerate(zip(prompts, [1, 2, 3]))]
    with torch.no_grad():
        while sched.has_work():
            sched.step()
    assert outcome(seqs) == outcome(want)
    assert sched.graphs.counts["static"] > 0


def test_a_step_that_cannot_be_captured_runs_eagerly(caplog):
    """A capture that raises (on CUDA: a host sync inside, e.g. the MoE loop path) leaves the
    key eager for good, with the same tokens, and says so on stderr."""
    model = tiny_model(9)
    g = fake_cuda_graphs()

    def refuse(graph, fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    g._record = refuse  # type: ignore[method-assign]
    p = decoder_params("threshold", "dual", gen_length=32)
    prompts = random_prompts(0, [5, 12, 2], 40, MASK)
    want = outcome(denoise(model, prompts, p, [0, 2, 3], cuda_graphs=False))
    for _ in range(3):
        assert outcome(denoise(model, prompts, p, [0, 2, 3], cuda_graphs=g)) == want
    assert g.counts["failed"] > 0 and g.counts["replayed"] == g.counts["captured"] == 0
    assert "no CUDA graph for a block step" in caplog.text

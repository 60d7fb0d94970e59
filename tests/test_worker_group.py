"""Worker groups (issue 16): tensor parallel 2 served by real dinfer-worker processes (gloo,
float64) gives a single process's tokens through the Client (generate and stream); a killed rank
fails its group (streams end with WorkerDiedError within 2 s) and the Client restarts it as one;
a group spans two "nodes" (two dinfer-worker processes on 127.0.0.1); GPU placement as pure
functions. test_group_families.py runs dinfer-batch with a group on every family.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dinfer_async import Client, SamplingParams
from dinfer_async.batch import started_line
from dinfer_async.errors import InvalidRequestError, WorkerDiedError
from dinfer_async.placement import device_flags, place, visible_gpus
from tests.client_helpers import free_endpoint
from workers.main import parser as worker_parser
from workers.parallel import ranks

ROOT = Path(__file__).resolve().parent.parent
WORKER = [sys.executable, "-m", "workers.main"]


# ---- placement: pure functions ----------------------------------------------------------------


def test_each_worker_gets_its_own_gpus():
    assert place("cuda", 2, 2, None, visible=4) == [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    assert place("cuda", 3, 1, None, visible=8) == [["cuda:0"], ["cuda:1"], ["cuda:2"]]
    assert place("cuda", 2, 1, [5, 3], visible=8) == [["cuda:5"], ["cuda:3"]]
    assert place("cuda:1", 1, 1) == [["cuda:1"]]
    assert place("cuda", 1, 1, None, visible=None) == [["cuda:0"]]  # the worker checks
    assert place("cpu", 2, 2) == [["cpu", "cpu"], ["cpu", "cpu"]]
    assert device_flags(["cuda:2", "cuda:3"]) == ["--device", "cuda", "--gpus", "2,3"]
    assert device_flags(["cuda:2"]) == ["--device", "cuda:2"]
    assert device_flags(["cpu", "cpu"]) == ["--device", "cpu"]


@pytest.mark.parametrize(
    ("args", "field", "words"),
    [
        (("cuda", 3, 2, None, 4), "workers", "need 6 GPUs but 4 GPU(s) are visible"),
        (("cuda", 2, 2, [0, 1, 2], 8), "workers", "need 4 GPUs but gpus lists 3"),
        (("cuda", 1, 2, [0, 9], 4), "gpus", "only 4 are visible"),
        (("cuda", 1, 2, [1, 1], 4), "gpus", "distinct"),
        (("cuda", 1, 2, None, None), "gpus", "cannot count the GPUs"),
        (("cuda", 1, 1, None, 0), "workers", "0 GPU(s) are visible"),
        (("cuda:0", 2, 1, None, 4), "device", "names one GPU"),
        (("cpu", 1, 1, [0], None), "gpus", "device='cuda'"),
    ],
)
def test_too_few_gpus_is_a_clear_error(args, field, words):
    with pytest.raises(InvalidRequestError) as info:
        place(*args)
    assert info.value.field == field and words in info.value.reason


def test_visible_gpus_without_torch():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == 3
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == 1  # CUDA stops at -1
    assert visible_gpus({}, smi=False) is None


def test_client_argv_per_worker(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    client = Client(device="cuda", workers=2, tensor_parallel_size=2, expert_parallel=True)
    assert client._placement == [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    client._devices_of = {"e0": client._placement[0], "e1": client._placement[1]}
    argv = client._worker_argv("e1")
    assert argv[argv.index("--gpus") + 1] == "2,3" and argv[argv.index("--device") + 1] == "cuda"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert "--enable-expert-parallel" in argv
    with pytest.raises(InvalidRequestError, match="need 6 GPUs but 4"):
        Client(device="cuda", workers=3, tensor_parallel_size=2)
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size"):
        Client(tensor_parallel_size=0)
    with pytest.raises(InvalidRequestError, match="expert_parallel"):
        Client(expert_parallel=True)
    cpu = Client(workers=1, tensor_parallel_size=2)._worker_argv("e")
    assert cpu[cpu.index("--device") + 1] == "cpu" and "--gpus" not in cpu
    assert "--expert-parallel-dispatch" not in argv and "--steps-per-check" not in cpu
    more = Client(
        tensor_parallel_size=2, expert_parallel="all_to_all", steps_per_check=4, rank_timeout=30
    )._worker_argv("e")
    args = worker_parser().parse_args(more[3:])  # what the worker makes of it
    assert (args.enable_expert_parallel, args.expert_parallel_dispatch) == (True, "all_to_all")
    assert (args.steps_per_check, args.rank_timeout) == (4, 30.0)
    for bad in (dict(expert_parallel="some"), dict(steps_per_check=0), dict(rank_timeout=-1)):
        with pytest.raises(InvalidRequestError, match=next(iter(bad))):
            Client(tensor_parallel_size=2, **bad)


def test_batch_and_serve_refuse_too_few_gpus_on_one_line(tmp_path, monkeypatch, capsys):
    from dinfer_async import batch, serve

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n')
    flags = ["--device", "cuda", "--workers", "2", "--tensor-parallel-size", "2"]
    assert batch.main([str(src), str(tmp_path / "out.jsonl"), *flags]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "dinfer-batch: error: --workers: 2 worker(s) x tensor_parallel_size 2 need 4"
    )
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(SystemExit) as info:
        serve.main(["--port", str(ranks.free_port()), *flags])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dinfer-serve: error: --workers:") and "1 GPU(s) are visible" in line


def test_batch_and_serve_name_the_expert_parallel_flag(tmp_path, capsys):
    """--enable-expert-parallel without a group: the flags are named (was: '--expert-parallel:
    ... set tensor_parallel_size > 1', the Client's keyword names as flags)."""
    from dinfer_async import batch, serve

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n')
    assert batch.main([str(src), str(tmp_path / "out.jsonl"), "--enable-expert-parallel"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dinfer-batch: error: --enable-expert-parallel splits"), line
    assert "add --tensor-parallel-size 2" in line
    with pytest.raises(SystemExit) as info:
        serve.main(["--port", str(ranks.free_port()), "--enable-expert-parallel"])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dinfer-serve: --enable-expert-parallel splits"), line


@pytest.mark.parametrize("flag", ["--workers", "--tensor-parallel-size"])
def test_batch_and_serve_refuse_counts_below_one(tmp_path, capsys, flag):
    from dinfer_async import batch, serve

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n')
    assert batch.main([str(src), str(tmp_path / "out.jsonl"), flag, "0"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"dinfer-batch: error: {flag}: must be >= 1", line
    with pytest.raises(SystemExit) as info:
        serve.main(["--port", str(ranks.free_port()), flag, "0"])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"dinfer-serve: {flag}: must be >= 1"), line


def test_batch_start_up_line_names_the_devices():
    class Ready:
        worker_devices = [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]

    assert started_line(Ready(), 3.14) == (
        "2 workers ready in 3.1 s: worker 0 on cuda:0,cuda:1; worker 1 on cuda:2,cuda:3"
    )


# ---- ranks: where a process sits ----------------------------------------------------------------


def test_place_from_flags_and_from_torchrun():
    one = ranks.place(2, master_port=1234)
    assert (one.rank, one.size, one.local_size, one.starts_others) == (0, 2, 2, True)
    node1 = ranks.place(4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29500)
    assert (node1.rank, node1.local_size, node1.master_addr) == (2, 2, "10.0.0.1")
    env = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    env |= dict(MASTER_ADDR="h", MASTER_PORT="29500")
    run = ranks.place(None, env=env)
    assert (run.rank, run.size, run.local_rank, run.node_rank, run.torchrun) == (3, 4, 1, 1, True)
    assert not run.starts_others  # torchrun started every rank
    child = ranks.child_env(one, 1, {})
    assert (child["RANK"], child["LOCAL_RANK"], child["MASTER_PORT"]) == ("1", "1", "1234")
    spawned = ranks.place(None, env=child)
    assert spawned.spawned and not spawned.torchrun and not spawned.starts_others


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(tensor_parallel_size=3, nnodes=2, master_addr="a", master_port=1), "multiple"),
        (dict(tensor_parallel_size=2, nnodes=2), "--master-addr and --master-port"),
        (dict(tensor_parallel_size=2, nnodes=2, node_rank=2, master_addr="a"), "--node-rank 2"),
        (dict(tensor_parallel_size=0), "must be >= 1"),
    ],
)
def test_place_refuses_with_the_fix(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ranks.place(env={}, **kwargs)
    env = dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", MASTER_ADDR="h", MASTER_PORT="1")
    with pytest.raises(ValueError, match="WORLD_SIZE=4"):
        ranks.place(2, env=env)


def test_worker_refuses_bad_group_flags(capsys):
    from workers.main import main

    for argv, words in (
        (["--enable-expert-parallel"], "add --tensor-parallel-size 2"),
        (["--tensor-parallel-size", "2", "--device", "cuda:1"], "names one GPU"),
        (["--tensor-parallel-size", "2", "--gpus", "0,1"], "--gpus is for --device cuda"),
        (["--nnodes", "2", "--tensor-parallel-size", "2"], "--master-addr"),
        (["--rank-timeout", "-1"], "--rank-timeout -1.0 must be a number of seconds >= 0"),
    ):
        assert main(["--endpoint", "ipc:///tmp/x.sock", *argv]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and words in lines[0], lines


def test_a_rank_that_cannot_start_is_named_on_rank_zeros_line(caplog):
    """A started rank hands its start-up error to rank 0, whose watcher says it once."""
    codes: list[int] = []
    local = ranks.LocalRanks(ranks.place(2, env={}), ["--no-such-flag"], on_failure=codes.append)
    local.starting = False  # serving: no grace before the watcher acts
    try:
        deadline = time.monotonic() + 60
        while not codes and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        local.stop()
    assert codes == [ranks.FAILED_EXIT]
    said = [r.getMessage() for r in caplog.records if "rank 1" in r.getMessage()]
    assert said and "could not start" in said[0] and "--no-such-flag" in said[0], said


def test_a_released_rank_is_not_a_failure():
    """Exit code 0 is a rank that rank 0 released (stopping): the watcher lets it go."""
    codes: list[int] = []
    local = ranks.LocalRanks(ranks.place(2, env={}), ["--version"], on_failure=codes.append)
    local.starting = False
    try:
        assert local.procs[1].wait(timeout=60) == 0
        time.sleep(5 * ranks.POLL)  # the watcher has looked at it since
        assert codes == []
    finally:
        local.stop()


def test_a_step_that_does_not_end_is_a_stall():
    """watch_steps fires once a Leader's step has run past the bound, never while it is idle
    or its steps end in time."""
    from workers.parallel.spmd import watch_steps

    class Steps:
        busy_since: float | None = None

    leader, stalls = Steps(), []
    watch_steps(lambda: leader, 0.3, 2, on_stall=lambda lead, t, n: stalls.append((t, n)))
    for _ in range(8):  # steps of 0.1 s, idle between them
        leader.busy_since = time.monotonic()
        time.sleep(0.1)
        leader.busy_since = None
        time.sleep(0.05)
    assert stalls == []
    leader.busy_since = time.monotonic()
    deadline = time.monotonic() + 30
    while not stalls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stalls == [(0.3, 2)]


# ---- real groups (gloo, float64) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    """A random tiny LLaDA-MoE (6 experts, 4 heads) with the bundled model's tokenizer."""
    from tests.tiny_models import random_model, tiny_family_raw
    from workers.bundled import MODEL_DIR
    from workers.loader import save_model

    path = tmp_path_factory.mktemp("moe")
    raw = tiny_family_raw(
        "lladamoe", vocab_size=263, mask_token_id=262, eos_token_id=257, max_position_embeddings=256
    )
    model = random_model(raw, seed=3, std=0.4)
    del raw["rope_scaling"]  # null anyway; transformers' tokenizer loader warns about the key
    save_model(model, path, raw)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(MODEL_DIR, name), path / name)
    return path


def reference(model: Path | None, prompts: list, params: list[SamplingParams]) -> list:
    """One process's answers; a prompt is raw text or chat messages."""
    from workers.engine import Engine

    engine = Engine.from_pretrained(model, dtype="float64")
    ids = [engine.encode(messages=p) if isinstance(p, list) else p for p in prompts]
    return [r.token_ids for r in engine.generate(ids, params)]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        # a zombie is dead too (its parent has not reaped it yet)
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


PROMPTS = ["add 017+025=", "sort 5 1 4 2 3 =", "reverse stone ="]
CHATS = [
    [{"role": "user", "content": text}]
    for text in ("copy dream lunar happy paper", "sort 200789", "reverse stone river")
]
PARAMS = [
    SamplingParams(gen_length=16, block_length=8, decoder="threshold", threshold=0.8, seed=1),
    SamplingParams(gen_length=16, block_length=4, cache="none", decoder="fixed", steps=8, seed=2),
    SamplingParams(gen_length=16, block_length=8, cache="vicinity", temperature=0.8, seed=3),
]


def _answer(chunks: list, eos: int = 257) -> list[int]:
    """A stream's token ids: each block's final chunk in block order, cut at EOS."""
    blocks = {c.block: c.tokens for c in chunks if c.final}
    ids = [t for b in sorted(blocks) for t in blocks[b]]
    return ids[: ids.index(eos)] if eos in ids else ids


async def _until(check, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "waited too long"
        await asyncio.sleep(0.05)


def test_tensor_parallel_group_through_the_client_and_a_killed_rank():
    """TP 2 on the bundled model: a single process's tokens; a follower killed mid-stream ends
    the stream with WorkerDiedError and the group comes back; killed while idle, it is noticed
    too; rank 0 killed takes its follower with it."""
    want = reference(None, CHATS, PARAMS)
    assert any(len(t) > 3 for t in want), "the comparison needs real answers"
    long = SamplingParams(gen_length=256, block_length=8, decoder="fixed", steps=256, seed=4)
    long.early_stop = False

    async def run() -> None:
        async with Client(tensor_parallel_size=2, dtype="float64", max_restarts=5) as client:
            got = await asyncio.gather(
                *(client.generate(messages=m, params=q) for m, q in zip(CHATS, PARAMS))
            )
            assert [c.token_ids for c in got] == want
            assert client.worker_devices == [["cpu", "cpu"]]
            streamed = [chunk async for chunk in client.stream(messages=CHATS[1], params=PARAMS[1])]
            assert _answer(streamed) == want[1]
            rank0 = client.welcome.pid
            (follower,) = _children(rank0)
            killed = None
            with pytest.raises(WorkerDiedError):
                async for chunk in client.stream(messages=CHATS[0], params=long):
                    if chunk.block == 0 and killed is None:
                        os.kill(follower, signal.SIGKILL)
                        killed = time.monotonic()
            assert killed is not None
            # issue 16's bound, from the kill to the stream's error
            assert time.monotonic() - killed < 2.0, time.monotonic() - killed
            await _until(lambda: client.restarts == 1)
            await client.wait_ready(120)
            await _until(lambda: _gone(rank0))
            again = await client.generate(messages=CHATS[0], params=PARAMS[0])
            assert again.token_ids == want[0]
            # idle: the watcher ends rank 0, the client restarts the group
            rank0 = client.welcome.pid
            (follower,) = _children(rank0)
            os.kill(follower, signal.SIGKILL)
            await _until(lambda: client.restarts == 2)
            await client.wait_ready(120)
            # rank 0 killed: its follower dies with it (PDEATHSIG)
            rank0 = client.welcome.pid
            (follower,) = _children(rank0)
            os.kill(rank0, signal.SIGKILL)
            await _until(lambda: _gone(follower))

    asyncio.run(run())


def test_the_groups_first_collective_is_not_a_step():
    """Rank 0 serves (and its first keepalive waits) while the other ranks may still be loading
    the model: that first meeting is not bounded by the rank timeout; the steps after it are."""
    from workers.parallel.spmd import Leader, watch_steps

    class LoadingRanks:  # the followers reach `follow` only after a long load
        calls = 0

        def broadcast(self, objects: list) -> list:
            self.calls += 1
            time.sleep(1.0 if self.calls == 1 else 0.0)
            return objects

    class Idle:
        def step(self) -> list:
            time.sleep(1.0)  # a step that hangs
            return []

    leader, stalls = Leader(Idle(), LoadingRanks()), []  # type: ignore[arg-type]
    watch_steps(lambda: leader, 0.3, 2, on_stall=lambda lead, t, n: stalls.append(t))
    leader.keepalive()
    assert stalls == []
    leader.step()
    deadline = time.monotonic() + 30
    while not stalls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stalls == [0.3]


def test_a_hung_rank_fails_its_group_after_the_rank_timeout(monkeypatch, caplog):
    """A follower stopped mid-stream (SIGSTOP: alive, so no collective fails and rank 0 still
    answers heartbeats) stalls rank 0's step; after --rank-timeout (3 s here, the Client's
    workers take it from $DINFER_RANK_TIMEOUT) rank 0 exits, the stream ends with
    WorkerDiedError, the stopped rank dies with rank 0 and the group comes back."""
    monkeypatch.setenv("DINFER_RANK_TIMEOUT", "3")
    caplog.set_level(logging.INFO, logger="dinfer_async.worker")  # the workers' stderr lines
    want = reference(None, CHATS[:1], PARAMS[:1])
    long = SamplingParams(gen_length=256, block_length=8, decoder="fixed", steps=256, seed=4)
    long.early_stop = False

    async def run() -> None:
        async with Client(tensor_parallel_size=2, dtype="float64", max_restarts=2) as client:
            (follower,) = _children(client.welcome.pid)
            stopped = None
            try:
                with pytest.raises(WorkerDiedError):
                    async for chunk in client.stream(messages=CHATS[0], params=long):
                        if chunk.block == 0 and stopped is None:
                            os.kill(follower, signal.SIGSTOP)
                            stopped = time.monotonic()
                assert stopped is not None
                # the bound plus a generous margin (a step began before the stop)
                assert time.monotonic() - stopped < 3.0 + 5.0, time.monotonic() - stopped
                await _until(lambda: _gone(follower))
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(follower, signal.SIGKILL)
            await _until(lambda: client.restarts == 1)
            await client.wait_ready(120)
            again = await client.generate(messages=CHATS[0], params=PARAMS[0])
            assert again.token_ids == want[0]

    asyncio.run(run())
    said = [r.getMessage() for r in caplog.records if "a rank is hung" in r.getMessage()]
    assert len(said) == 1 and "has not completed in 3 s (--rank-timeout)" in said[0], said


@contextlib.contextmanager
def _started(*commands: list[str]):
    procs = [
        subprocess.Popen(c, cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    try:
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
            assert p.stderr is not None
            p.stderr.close()


def test_a_group_over_two_nodes_serves_one_client(moe_dir):
    """Two dinfer-worker processes, --nnodes 2 on 127.0.0.1 (one rank each): only node 0 binds;
    one Client connects to that group and to a single-process worker and spreads requests over
    both; a single process's tokens from each; node 1 killed ends node 0 too."""
    endpoint, single, port = free_endpoint(), free_endpoint(), ranks.free_port()
    model = [*WORKER, "--model", str(moe_dir), "--dtype", "float64"]
    common = [*model, "--tensor-parallel-size", "2", "--nnodes", "2"]
    common += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    params = [SamplingParams(gen_length=16, block_length=8, early_stop=False, seed=5)] * 2
    want = reference(moe_dir, PROMPTS[:2], params)

    async def ask() -> list[list[int]]:
        client = await Client.connect([endpoint, single], connect_timeout=120)
        try:
            assert client.worker_devices == [["cpu", "cpu"], ["cpu"]]
            async with client.stream(prompt=PROMPTS[0], params=params[0]) as first:
                chunks = [await first.__anext__()]
                async with client.stream(prompt=PROMPTS[1], params=params[1]) as second:
                    other = [chunk async for chunk in second]
                    assert first._worker is not second._worker  # the least-loaded one
                chunks += [chunk async for chunk in first]
            return [_answer(chunks), _answer(other)]
        finally:
            await client.close()

    with _started(
        [*common, "--node-rank", "0", "--endpoint", endpoint],
        [*common, "--node-rank", "1"],
        [*model, "--endpoint", single],
    ) as (node0, node1, _):
        assert asyncio.run(ask()) == want
        node1.kill()
        assert node0.wait(timeout=60) == ranks.FAILED_EXIT  # its keepalive collective failed
        assert node0.stderr is not None
        assert "the tensor-parallel group failed" in node0.stderr.read()


def test_a_group_that_cannot_start_says_so_on_one_line(moe_dir, tmp_path):
    """T=3 does not divide the model's 4 heads: every rank fails; one line, exit 2."""
    proc = subprocess.run(
        [*WORKER, "--model", str(moe_dir), "--endpoint", f"ipc://{tmp_path}/w.sock"]
        + ["--tensor-parallel-size", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "does not divide the model's 4 attention heads" in lines[0]

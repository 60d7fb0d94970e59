"""dinfer-batch through worker processes on the bundled model: one output line per input line,
errors keyed by line number, input order, crash-safe resume, bounded memory."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import anyio
import pytest

from dinfer_async.batch import main

FAST = ["--gen-length", "32", "--block-length", "32", "--threads", "1"]
CLI = [sys.executable, "-m", "dinfer_async.batch"]


def write_lines(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def read_records(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def ask(i):
    return {
        "id": f"q{i}",
        "messages": [{"role": "user", "content": f"reverse word{chr(97 + i % 26)}x"}],
    }


def test_bad_lines_get_error_records_and_the_run_goes_on(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(
        src,
        [
            {"id": "a", "messages": [{"role": "user", "content": "reverse abc"}]},
            "{not json",
            {"id": "b"},
            {"id": "c", "prompt": "x", "gen_length": 10},
            {"id": "a", "messages": [{"role": "user", "content": "reverse xyz"}]},
            {"id": "d", "messages": [{"role": "robot", "content": "hi"}]},
            [1, 2],
            {
                "id": 7,
                "messages": [{"role": "user", "content": "in aab count a"}],
                "decoder": "fixed",
                "steps": 32,
                "cache": "none",
            },
            {"id": "long", "prompt": "x" * 3000},
        ],
    )
    assert main([str(src), str(dst)] + FAST) == 1
    out = read_records(dst)
    assert [o.get("id") for o in out] == ["a", None, "b", "c", "a", "d", None, 7, "long"]
    errors = {o["error"]["line"]: o["error"]["message"] for o in out if "error" in o}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 9]
    assert "invalid JSON" in errors[2]
    assert "prompt" in errors[3] and "messages" in errors[3]
    assert "gen_length" in errors[4]
    assert "duplicate id" in errors[5]
    assert "messages[0].role" in errors[6]
    assert "max_sequence_length" in errors[9]
    for good in (out[0], out[7]):
        assert set(good) == {"id", "text", "token_ids", "finish_reason", "stats"}
        stats = good["stats"]
        assert set(stats) == {
            "forwards",
            "tokens",
            "tokens_per_forward",
            "committed_per_forward",
            "prompt_tokens",
            "edits",
            "seconds",
        }
        assert stats["edits"] == 0  # only the joint decoder edits committed tokens
        assert good["finish_reason"] in ("eos", "length") and stats["forwards"] >= 1
        # answer tokens per forward, apart from committed positions (EOS padding included)
        assert stats["tokens_per_forward"] == round(stats["tokens"] / stats["forwards"], 4)
        assert stats["committed_per_forward"] >= stats["tokens_per_forward"]
        assert stats["prompt_tokens"] > 0
    assert out[7]["stats"]["forwards"] == 32  # per-line params override the flags


def test_stdin_to_stdout_in_input_order_and_exit_code_zero():
    lines = [ask(i) for i in range(12)]
    proc = subprocess.run(
        CLI + ["-", "-", "--max-concurrency", "4"] + FAST,
        input="".join(json.dumps(l) + "\n" for l in lines),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [o["id"] for o in out] == [l["id"] for l in lines]
    assert "\ndinfer-batch: 12 lines: 0 already done, 12 new (0 errors)" in "\n" + proc.stderr
    assert "dinfer-batch: dinfer-batch" not in proc.stderr  # one prefix per line
    assert "tokens per forward" in proc.stderr and "committed per forward" in proc.stderr


def test_openai_batch_lines(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(
        src,
        [
            {
                "custom_id": "c1",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "x",
                    "messages": [{"role": "user", "content": "reverse abc"}],
                    "max_tokens": 20,
                },
            },
            {"custom_id": "c2", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        ],
    )
    assert main([str(src), str(dst)] + FAST) == 1
    ok, bad = read_records(dst)
    assert ok["custom_id"] == "c1" and ok["error"] is None and ok["response"]["status_code"] == 200
    body = ok["response"]["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert bad["custom_id"] == "c2" and bad["response"] is None and "url" in bad["error"]["message"]


def test_bad_flag_is_refused_before_starting_anything(capsys):
    with pytest.raises(SystemExit) as e:  # argparse checks the choices, which come from params.py
        main(["in", "out", "--decoder", "greedy"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--decoder" in err and len(err.strip().splitlines()) == 1
    assert main(["in", "out", "--threshold", "1.5"]) == 2
    assert "threshold" in capsys.readouterr().err


def test_sigkill_at_any_moment_then_rerun_gives_exactly_one_line_per_id(tmp_path):
    """Killed once while starting up and three times just after it wrote something (at a random
    moment within a few hundred ms, so also mid-write), then rerun to the end."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [ask(i) for i in range(60)]
    lines[5] = {"id": "broken"}  # an error record must survive resumes too
    write_lines(src, lines)
    rng = random.Random(1)
    sizes = []
    # the fixed decoder takes gen_length forwards per request whatever the model, so the run lasts
    # long enough (seconds) for the kills to land mid-run
    command = CLI + [str(src), str(dst), "--max-concurrency", "4", "--decoder", "fixed"] + FAST
    for attempt in range(4):
        before = dst.stat().st_size if dst.exists() else 0
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 0:
            time.sleep(rng.uniform(0.3, 1.5))
        else:
            deadline = time.time() + 60
            while (dst.stat().st_size if dst.exists() else 0) <= before and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "orphaned workers must exit"
        sizes.append(dst.stat().st_size if dst.exists() else 0)
    assert sizes == sorted(sizes)
    final = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert final.returncode == 1, final.stderr  # the broken line failed
    text = dst.read_text()
    assert sum(0 < size < len(text.encode()) for size in sizes) >= 2, (
        f"kills did not land mid-run: {sizes}"
    )
    assert text.endswith("\n")
    out = [json.loads(l) for l in text.splitlines()]
    assert [o["id"] for o in out] == [l["id"] for l in lines], "one record per line, in input order"
    assert "error" in out[5] and all("text" in o for i, o in enumerate(out) if i != 5)


def test_ctrl_c_stops_workers_and_all_cleanly_and_says_how_to_resume(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it to the CLI and its
    workers: exit 130, the summary and the resume command, no traceback from anyone."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [ask(i) for i in range(40)])
    command = CLI + [str(src), str(dst), "--max-concurrency", "2", "--decoder", "fixed"] + FAST
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while (dst.stat().st_size if dst.exists() else 0) == 0 and time.time() < deadline:
        time.sleep(0.02)
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "already done" in err and "interrupted by SIGINT; to resume, run the same command" in err
    deadline = time.time() + 5
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert workers and not any(_alive(w) for w in workers)
    out = read_records(dst)
    assert 1 <= len(out) < 40 and [o["id"] for o in out] == [f"q{i}" for i in range(len(out))]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid):
    """Worker processes whose parent was `pid` (a SIGKILLed CLI cannot stop its workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def test_memory_stays_bounded_on_a_long_input(tmp_path):
    """100,000 lines stream through: peak memory grows by far less than the file's size would."""

    def peak(n):
        src, dst = tmp_path / f"in{n}.jsonl", tmp_path / f"out{n}.jsonl"
        with open(src, "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": i, "prompt": "", "padding": "p" * 200}) + "\n")
        code = (
            "import sys; from dinfer_async.batch import main; "
            f"rc = main([{str(src)!r}, {str(dst)!r}, '--threads', '1']); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
        )
        assert len(dst.read_text().splitlines()) == n, proc.stderr
        return int(proc.stdout.split()[-1]) / 1024  # MiB

    small, large = peak(1_000), peak(100_000)
    assert large - small < 40, (
        f"peak RSS {small:.0f} MiB for 1k lines, {large:.0f} MiB for 100k "
        f"(input {100_000 * 230 / 2**20:.0f} MiB)"
    )


def test_output_file_cuts_a_partial_last_line_and_remembers_what_is_done(tmp_path):
    from dinfer_async.output import InOrder, OutputFile

    src, path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("")
    stats = {"forwards": 1, "tokens": 1, "tokens_per_forward": 1.0, "seconds": 0.1}
    good = [
        {"id": "a", "text": "x", "token_ids": [1], "finish_reason": "eos", "stats": stats},
        {"id": None, "error": {"line": 4, "message": "bad"}},
    ]
    kept = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(kept + '{"id": "b", "te')
    out = OutputFile(str(path), str(src))
    assert out.done == {'id:"a"', "line:4"} and out.errors_before == 1
    assert path.read_text() == kept + '{"id": "b", "te', "nothing is cut before the run starts"
    out.open()
    assert path.read_text() == kept
    written = []
    order = InOrder(out, window=4, on_write=written.append)
    slots = [anyio.run(order.reserve) for _ in range(3)]
    order.put(slots[2], 7, {"id": "z"})
    order.put(slots[0], 5, {"id": "x"})
    assert [json.loads(l)["id"] for l in path.read_text().splitlines()] == ["a", None, "x"]
    order.put(slots[1], 6, {"id": "y"})
    out.close()
    assert [json.loads(l)["id"] for l in path.read_text().splitlines()] == [
        "a",
        None,
        "x",
        "y",
        "z",
    ]
    assert [r["id"] for r in written] == ["x", "y", "z"]


def test_keeps_max_concurrency_requests_in_flight(tmp_path, monkeypatch):
    """With a stand-in client (no workers), the CLI keeps --max-concurrency requests in flight and
    still writes records in input order although they finish out of order."""
    import dinfer_async.client as client_module
    from dinfer_async.client import Completion
    from dinfer_async.protocol import Welcome

    state = {"now": 0, "peak": 0}

    class FakeClient:
        def __init__(self, **kwargs):
            self.welcome = Welcome(1, "fake", "t", 100, 256, 1, 2, 0)

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            pass

        async def generate(self, prompt=None, messages=None, params=None):
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            await anyio.sleep(random.Random(messages[0]["content"]).uniform(0.001, 0.02))
            state["now"] -= 1
            stats = {"forwards": 1, "tokens": 1, "tokens_per_forward": 1.0, "seconds": 0.01}
            return Completion(messages[0]["content"][::-1], [1], "eos", stats)

    monkeypatch.setattr(client_module, "Client", FakeClient)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [ask(i) for i in range(200)]
    write_lines(src, lines)
    assert main([str(src), str(dst), "--max-concurrency", "16"]) == 0
    assert state["peak"] == 16
    assert [o["id"] for o in read_records(dst)] == [l["id"] for l in lines]


def test_engine_stats_keep_answer_tokens_and_committed_positions_apart():
    """Stats (engine) and the stats of a stream's last chunk (worker) carry prompt_tokens,
    tokens_per_forward = tokens / forwards and committed_per_forward (EOS padding included)."""
    from dinfer_async import SamplingParams
    from workers import Engine

    engine = Engine.from_pretrained(None, device="cpu", dtype="float32")
    ids = engine.encode(messages=[{"role": "user", "content": "reverse abc"}])
    [result] = engine.generate([ids], SamplingParams(gen_length=64, block_length=32))
    s = result.stats
    assert s.prompt_tokens == len(ids)
    assert s.tokens == len(result.token_ids) and s.tokens_per_forward == s.tokens / s.forwards
    assert s.committed_per_forward == s.committed / s.forwards >= s.tokens_per_forward

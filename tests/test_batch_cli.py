"""dinfer-batch on the bundled model: one output line per input line, errors keyed by line number."""

import json
import subprocess
import sys

from dinfer_async.batch import main

FAST = ["--gen-length", "32", "--block-length", "32"]


def write_lines(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def test_bad_lines_get_error_records_and_the_run_goes_on(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [
        {"id": "a", "messages": [{"role": "user", "content": "reverse abc"}]},
        "{not json",
        {"id": "b"},
        {"id": "c", "prompt": "x", "gen_length": 10},
        {"id": "a", "messages": [{"role": "user", "content": "reverse xyz"}]},
        {"id": "d", "messages": [{"role": "robot", "content": "hi"}]},
        [1, 2],
        {"id": 7, "messages": [{"role": "user", "content": "count a in aab"}], "decoder": "fixed", "steps": 32, "cache": "none"},
    ])
    assert main([str(src), str(dst)] + FAST) == 1
    out = [json.loads(l) for l in dst.read_text().splitlines()]
    assert len(out) == 8
    assert [o.get("id") for o in out] == ["a", None, "b", "c", "a", "d", None, 7]
    errors = {o["error"]["line"]: o["error"]["message"] for o in out if "error" in o}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7]
    assert "invalid JSON" in errors[2]
    assert "prompt" in errors[3] and "messages" in errors[3]
    assert "gen_length" in errors[4]
    assert "duplicate id" in errors[5]
    assert "messages[0].role" in errors[6]
    for good in (out[0], out[7]):
        assert set(good) == {"id", "text", "token_ids", "finish_reason", "stats"}
        assert set(good["stats"]) == {"forwards", "tokens", "tokens_per_forward", "seconds"}
        assert good["finish_reason"] in ("eos", "length") and good["stats"]["forwards"] >= 1
    assert out[7]["stats"]["forwards"] == 32  # per-line params override the flags


def test_stdin_to_stdout_and_exit_code_zero(tmp_path):
    lines = [{"id": i, "messages": [{"role": "user", "content": f"copy word{i}"}]} for i in range(3)]
    proc = subprocess.run(
        [sys.executable, "-m", "dinfer_async.batch", "-", "-"] + FAST,
        input="".join(json.dumps(l) + "\n" for l in lines), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [o["id"] for o in out] == [0, 1, 2] and all("text" in o for o in out)
    assert "3 lines, 0 errors" in proc.stderr


def test_bad_flag_is_refused_before_loading_anything(tmp_path, capsys):
    assert main(["in", "out", "--decoder", "greedy"]) == 2
    assert "decoder" in capsys.readouterr().err

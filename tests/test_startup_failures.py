"""Start-up failures through real worker processes: dinfer-batch and dinfer-serve print one
line on stderr (the worker's own error, forwarded once, not twice), exit 2, and create no
output file. The fake-client tests in test_batch_faults.py cover the batch side's handling;
these check that the worker, the client's stderr forwarding and the command agree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch


def run(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    env.pop("DINFER_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120, env=env
    )


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


FAILURES = [
    (["--model", "nobody/no-such-model"], "not in the Hugging Face cache"),
    pytest.param(
        ["--device", "cuda"],
        "CUDA is not available",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
    ),
]


def batch(tmp_path, *flags: str) -> str:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "add 12+34"}\n')
    line = one_line(run(tmp_path, "dinfer_async.batch", str(src), str(dst), *flags))
    assert not dst.exists()
    return line


@pytest.mark.parametrize("flags, cause", FAILURES)
def test_dinfer_batch_start_up_failure_is_one_line(tmp_path, flags, cause):
    line = batch(tmp_path, *flags)
    assert line.startswith("dinfer-batch: error: could not start the workers: ") and cause in line


def test_dinfer_batch_model_without_tokenizer_is_one_line(tmp_path):
    from workers.bundled import MODEL_DIR

    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    line = batch(tmp_path, "--model", str(model))
    assert "could not start the workers" in line and "tokenizer" in line


def test_dinfer_batch_unsupported_dtype_is_one_line(tmp_path):
    assert "--dtype: invalid choice: 'int8'" in batch(tmp_path, "--dtype", "int8")


def test_dinfer_serve_start_up_failure_is_one_line(tmp_path):
    proc = run(tmp_path, "dinfer_async.serve", "--model", "nobody/no-such-model", "--port", "0")
    line = one_line(proc)
    assert line.startswith("dinfer-serve: error: could not start the workers: ")
    assert "not in the Hugging Face cache" in line


def test_dinfer_serve_bad_flag_is_one_line(tmp_path):
    line = one_line(run(tmp_path, "dinfer_async.serve", "--dtype", "int8"))
    assert "--dtype: invalid choice: 'int8'" in line  # not argparse's 25-line usage first

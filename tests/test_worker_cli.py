"""dinfer-worker's start-up: every failure is one stderr line naming the cause and the fix, exit
code 2, a traceback only with --debug (or DINFER_LOG_LEVEL=debug); --version."""

from __future__ import annotations

import shutil
import socket

import pytest
import zmq

from dinfer_async import __version__
from workers.main import bind_problem, main


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err.splitlines()


def one_line_failure(capsys, *argv: str) -> str:
    code, lines = run(capsys, *argv)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("dinfer-worker: error: ")
    return lines[0]


@pytest.fixture
def ipc(tmp_path) -> str:
    return f"ipc://{tmp_path}/w.sock"


@pytest.fixture
def no_tokenizer(tmp_path):
    from workers.bundled import MODEL_DIR

    target = tmp_path / "model"
    shutil.copytree(MODEL_DIR, target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).unlink()
    return target


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dinfer-worker {__version__}"


def test_bad_model_path(capsys, ipc, tmp_path):
    line = one_line_failure(capsys, "--endpoint", ipc, "--model", str(tmp_path / "nope"))
    assert "no such directory" in line and "Hugging Face id" in line


def test_missing_tokenizer(capsys, ipc, no_tokenizer):
    line = one_line_failure(capsys, "--endpoint", ipc, "--model", str(no_tokenizer))
    assert "tokenizer" in line and "copy them" in line


def test_cuda_unavailable(capsys, ipc):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line_failure(capsys, "--endpoint", ipc, "--device", "cuda")
    assert "CUDA is not available" in line and "--device cpu" in line


def test_bad_device_and_dtype(capsys, ipc):
    assert "not a device" in one_line_failure(capsys, "--endpoint", ipc, "--device", "gpu0")
    line = one_line_failure(capsys, "--endpoint", ipc, "--dtype", "int8")
    assert "invalid choice: 'int8'" in line and "--help" in line
    assert "--endpoint" in one_line_failure(capsys)  # the required flag is named


def test_bad_steps_per_check_names_the_flag(capsys, ipc):
    """Refused before the model loads, naming the flag (was: 'steps_per_check' after loading)."""
    line = one_line_failure(capsys, "--endpoint", ipc, "--steps-per-check", "0")
    assert "--steps-per-check 0 must be >= 1" in line


def test_port_in_use(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_failure(capsys, "--endpoint", f"tcp://127.0.0.1:{port}")
    assert f"port {port} is in use" in line and "pick another port" in line


def test_ipc_socket_in_use(capsys, ipc):
    ctx = zmq.Context()
    live = ctx.socket(zmq.ROUTER)
    live.bind(ipc)
    try:
        line = one_line_failure(capsys, "--endpoint", ipc)
        assert "in use by another process" in line
    finally:
        live.close(linger=0)
        ctx.term()


def test_remote_without_curve_and_bad_keys(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DINFER_SECRET", "s3cret")
    line = one_line_failure(capsys, "--endpoint", "tcp://0.0.0.0:5555", "--allow-remote")
    assert "CURVE" in line and "dinfer-keys" in line
    (tmp_path / "bad.key_secret").write_text("not a certificate")
    for key in (tmp_path / "missing", tmp_path / "bad.key_secret"):
        line = one_line_failure(
            capsys, "--endpoint", "tcp://0.0.0.0:5555", "--allow-remote", "--curve-secret-key",
            str(key),
        )  # fmt: skip
        assert "--curve-secret-key" in line and "dinfer-keys" in line
    assert ">= " in one_line_failure(capsys, "--endpoint", "ipc:///x", "--max-frame-bytes", "10")


def test_tracebacks_only_when_asked(capsys, ipc, tmp_path, monkeypatch):
    missing = str(tmp_path / "nope")
    code, lines = run(capsys, "--endpoint", ipc, "--model", missing, "--debug")
    assert code == 2 and any(line.startswith("Traceback") for line in lines)
    monkeypatch.setenv("DINFER_LOG_LEVEL", "debug")
    code, lines = run(capsys, "--endpoint", ipc, "--model", missing)
    assert code == 2 and any(line.startswith("Traceback") for line in lines)


def test_bind_problems_name_the_fix():
    in_use = zmq.ZMQError(zmq.EADDRINUSE)
    assert "pick another port" in bind_problem("tcp://127.0.0.1:1", in_use)
    assert "create it" in bind_problem("ipc:///no/such/dir/x", zmq.ZMQError(2))

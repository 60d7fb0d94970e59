"""dinfer-batch under faults, with a stand-in client (no workers): any bytes in, one strict JSON
record per line out; an output file that is not ours is never touched; start-up failures and
refusals are one line and exit 2 with no file made; signals stop cleanly with a resume hint;
a line whose worker died is retried, boundedly."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dinfer_async.batch import main
from dinfer_async.errors import WorkerDiedError, WorkerError
from tests.fake_client import use

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict(data: bytes) -> list[dict]:
    """The records of an output file, failing on anything that is not strict UTF-8 JSON."""

    def refuse(name):
        raise AssertionError(f"{name} in the output")

    text = data.decode("utf-8")  # raises on invalid UTF-8
    assert text == "" or text.endswith("\n")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def lines(*items) -> bytes:
    return b"".join((i if isinstance(i, bytes) else json.dumps(i).encode()) + b"\n" for i in items)


def ask(i):
    return {"id": f"q{i}", "prompt": f"word{i}"}


def one_line(err: str) -> str:
    got = err.strip().splitlines()
    assert len(got) == 1, err
    assert "Traceback" not in err
    return got[0]


def test_every_line_gets_one_record_whatever_its_bytes(tmp_path, monkeypatch):
    use(monkeypatch)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    garbage = bytes(b for b in range(256) if b != 10)
    src.write_bytes(
        b"\xef\xbb\xbf"
        + lines(
            {"id": "a", "prompt": "hello"},
            b'{"id": "b", "prompt": "\\ud800"}',
            garbage,
            b'{"id": NaN, "prompt": "x"}',
            b'{"id": "c", "prompt": "x", "temperature": Infinity}',
            b'{"id": "big", "prompt": "' + b"x" * (10 << 20) + b'"}',
            b'{"id": "d", "prompt": "caf\xe9"}',
            b"",
            b'{"id": "e", "prompt": "crlf"}\r',
            {"id": "f", "prompt": "y" * 100_000},
            {"id": "g", "messages": [{"role": "user", "content": "chat \u00e9\u4e2d\U0001f600"}]},
        )
        + b'{"id": "h", "prompt": "no newline at the end"}'
    )
    assert main([str(src), str(dst)]) == 1
    out = strict(dst.read_bytes())
    assert [r["error"]["line"] for r in out if "error" in r] == [2, 3, 4, 5, 6, 7]
    assert [r["id"] for r in out] == ["a", "b", None, None, "c", None, None, "e", "f", "g", "h"]
    served = {r["id"]: r["text"] for r in out if "text" in r}
    assert served["a"] == "olleh" and served["e"] == "flrc" and len(served["f"]) == 100_000
    assert served["g"] == "chat \u00e9\u4e2d\U0001f600"[::-1]
    messages = [r["error"]["message"] for r in out if "error" in r]
    assert "surrogate" in messages[0] and "not UTF-8" in messages[1] and "NaN" in messages[2]
    assert "Infinity" in messages[3] and "over the limit" in messages[4]
    assert "not UTF-8" in messages[5]


def test_a_huge_line_costs_no_more_memory_than_a_small_one(tmp_path):
    def peak(size):
        src, dst = tmp_path / f"in{size}.jsonl", tmp_path / f"out{size}.jsonl"
        with open(src, "wb") as f:  # in pieces: a child's peak RSS starts at its parent's
            f.write(lines({"id": "a", "prompt": "x"}) + b'{"id": "')
            for _ in range(size >> 20):
                f.write(b"x" * (1 << 20))
            f.write(b'"}\n')
        code = (
            "import sys; import dinfer_async.client as c; "
            "from tests.fake_client import FakeClient; c.Client = FakeClient; "
            "from dinfer_async.batch import main; "
            f"main([{str(src)!r}, {str(dst)!r}]); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert len(strict(dst.read_bytes())) == 2, proc.stderr
        return int(proc.stdout.split()[-1]) / 1024  # MiB

    small, huge = peak(0), peak(100 << 20)
    assert huge - small < 40, f"peak RSS {small:.0f} MiB, {huge:.0f} MiB with a 100 MiB line"


@pytest.mark.parametrize(
    "content",
    [
        b"my notes\nmore notes\n",
        b'{"id": "g0"}\n',
        b'{"id": "g0"}',
        lines({"id": None, "error": {"line": 1, "message": "bad"}}) + b"a note\n",
        lines({"id": None, "error": {"line": 1, "message": "bad"}}) + b"notes, unterminated",
        b"\n",
    ],
)
def test_an_output_file_that_is_not_ours_is_refused_untouched(
    tmp_path, monkeypatch, capsys, content
):
    fake = use(monkeypatch)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(lines({"id": "g0", "prompt": "x"}))
    dst.write_bytes(content)
    assert main([str(src), str(dst)]) == 2
    assert dst.read_bytes() == content
    assert "not a dinfer-batch record" in one_line(capsys.readouterr().err)
    assert fake.last is None, "nothing started"


def test_only_a_partial_last_record_is_cut_and_a_rerun_says_what_was_done(
    tmp_path, monkeypatch, capsys
):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(lines(ask(0), ask(1), {"id": "bad"}, ask(3)))
    fake = use(monkeypatch)
    assert main([str(src), str(dst)]) == 1
    full = dst.read_bytes()
    first = full.split(b"\n")[0] + b"\n"
    dst.write_bytes(first + full[len(first) : len(first) + 25])  # a kill cut record 2 short
    capsys.readouterr()
    assert main([str(src), str(dst)]) == 1
    assert dst.read_bytes() == full
    assert fake.last.tries == {"word1": 1, "word3": 1}, "line 1 was not asked again"
    assert "4 lines: 1 already done, 3 new (1 errors)" in capsys.readouterr().err
    assert main([str(src), str(dst)]) == 1  # a finished job: nothing new, the old error counts
    assert "4 lines: 4 already done (1 with errors), 0 new" in capsys.readouterr().err
    assert dst.read_bytes() == full
    dst.write_bytes(full[:-1])  # cut just before the last newline: that record is redone
    assert main([str(src), str(dst)]) == 1
    assert dst.read_bytes() == full and fake.last.tries == {"word3": 1}


def test_in_equal_to_out_is_refused(tmp_path, monkeypatch, capsys):
    use(monkeypatch)
    src = tmp_path / "in.jsonl"
    data = lines(ask(0), ask(1))
    src.write_bytes(data)
    os.symlink(src, tmp_path / "link.jsonl")
    os.link(src, tmp_path / "hard.jsonl")
    for out in (src, tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        assert main([str(src), str(out)]) == 2
        assert "same file" in one_line(capsys.readouterr().err)
    assert src.read_bytes() == data
    with open(src, "rb") as stdin:  # dinfer-batch - in.jsonl < in.jsonl
        proc = subprocess.run(
            [sys.executable, "-m", "dinfer_async.batch", "-", str(src)],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2 and "same file" in one_line(proc.stderr)
    assert src.read_bytes() == data


def test_refusals_and_start_up_failures_are_one_line_exit_2_and_no_file(
    tmp_path, monkeypatch, capsys
):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(lines(ask(0)))
    fake = use(monkeypatch)
    cases = [
        ([str(tmp_path / "missing.jsonl"), str(dst)], "cannot read"),
        ([str(src), str(tmp_path / "no" / "dir" / "out.jsonl")], "no directory"),
        ([str(src), str(tmp_path)], "Is a directory"),
        ([str(src), str(dst), "--model", str(tmp_path / "no-model")], "no such directory"),
        ([str(src), str(dst), "--max-concurrency", "0"], "max-concurrency"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        assert expected in one_line(capsys.readouterr().err)
        assert not dst.exists() and not (tmp_path / "no").exists()
    assert fake.last is None
    cause = "worker 0 exited with 1 while starting: FileNotFoundError: no config.json in /x"
    use(monkeypatch, start_error=WorkerDiedError(cause))
    assert main([str(src), str(dst)]) == 2
    assert (
        one_line(capsys.readouterr().err)
        == f"dinfer-batch: error: could not start the workers: {cause}"
    )
    assert not dst.exists()
    assert main([str(src), str(dst), "--debug"]) == 2  # --debug: the traceback too
    assert "Traceback" in capsys.readouterr().err and not dst.exists()


def test_a_second_run_on_the_same_output_is_refused(tmp_path, monkeypatch, capsys):
    use(monkeypatch)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(lines(ask(0)))
    dst.write_bytes(b"")
    with open(dst, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main([str(src), str(dst)]) == 2
        assert "another dinfer-batch" in one_line(capsys.readouterr().err)
    assert main([str(src), str(dst)]) == 0
    with open(os.devnull, "rb") as held:  # not a file to resume: never locked
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main([str(src), os.devnull]) == 0


def test_a_line_whose_worker_died_is_retried_a_bounded_number_of_times(tmp_path, monkeypatch):
    def answer(text, attempt):
        if text == "dies once" and attempt == 1:
            raise WorkerDiedError("worker 0 exited with -9")
        if text == "kills every worker":
            raise WorkerDiedError("worker 0 exited with -11")
        if text == "times out":
            raise TimeoutError()
        if text == "bug":
            raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")

    fake = use(monkeypatch, answer=answer)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = ["dies once", "kills every worker", "times out", "bug", "fine"]
    src.write_bytes(lines(*({"id": p, "prompt": p} for p in prompts)))
    assert main([str(src), str(dst), "--retries", "3"]) == 1
    out = {r["id"]: r for r in strict(dst.read_bytes())}
    assert list(out) == prompts
    assert out["dies once"]["text"] == "ecno seid" and out["fine"]["text"] == "enif"
    assert "died on each of 3 tries" in out["kills every worker"]["error"]["message"]
    assert "TimeoutError" in out["times out"]["error"]["message"]
    assert "UnicodeEncodeError" in out["bug"]["error"]["message"]
    assert fake.last.tries["dies once"] == 2 and fake.last.tries["kills every worker"] == 3
    assert fake.last.waits == 1 + 2, "each retry waits for a ready worker first"


def test_no_ready_worker_stops_the_run_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    def answer(text, attempt):
        if text == "word5":
            raise WorkerDiedError("worker 0 exited with -9")

    def ready():
        raise WorkerError("worker 0 could not be restarted (3 tries): CUDA out of memory")

    use(monkeypatch, answer=answer, ready=ready)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(lines(*(ask(i) for i in range(10))))
    assert main([str(src), str(dst), "--max-concurrency", "1"]) == 3
    err = capsys.readouterr().err
    assert "no worker is ready" in err and "CUDA out of memory" in err and "Traceback" not in err
    assert f"to resume, run the same command: dinfer-batch {src} {dst}" in err
    assert [r["id"] for r in strict(dst.read_bytes())] == [f"q{i}" for i in range(5)]
    use(monkeypatch)
    assert main([str(src), str(dst), "--max-concurrency", "1"]) == 0
    assert [r["id"] for r in strict(dst.read_bytes())] == [f"q{i}" for i in range(10)]
    assert "10 lines: 5 already done, 5 new (0 errors)" in capsys.readouterr().err


SLOW_RUN = (
    "import sys, dinfer_async.client as c; from tests.fake_client import FakeClient; "
    "c.Client = type('Slow', (FakeClient,), {'delay': 0.05}); "
    "from dinfer_async.batch import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_cleanly_with_the_summary_and_how_to_resume(
    tmp_path, monkeypatch, signum, code
):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(lines(*(ask(i) for i in range(400))))
    argv = [str(src), str(dst), "--max-concurrency", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while (not dst.exists() or dst.read_bytes().count(b"\n") < 6) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert "already done" in err and "tokens per forward" in err, err
    assert f"interrupted by {signal.Signals(signum).name}" in err
    assert f"to resume, run the same command: dinfer-batch {' '.join(argv)}" in err
    done = [r["id"] for r in strict(dst.read_bytes())]
    assert 6 <= len(done) < 400 and done == [f"q{i}" for i in range(len(done))]
    use(monkeypatch)
    assert main(argv) == 0
    assert [r["id"] for r in strict(dst.read_bytes())] == [f"q{i}" for i in range(400)]


def test_version(capsys):
    from dinfer_async import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dinfer-batch {__version__}"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_output_that_cannot_be_written_stops_the_run(tmp_path, monkeypatch, capsys):
    use(monkeypatch)
    src = tmp_path / "in.jsonl"
    src.write_bytes(lines(*(ask(i) for i in range(5))))
    assert main([str(src), "/dev/full"]) == 3  # every write fails: No space left on device
    err = capsys.readouterr().err
    assert "cannot write /dev/full" in err and "to resume" in err and "Traceback" not in err

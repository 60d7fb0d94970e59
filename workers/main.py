"""dinfer-worker: one worker process serving a model over ZeroMQ.

    dinfer-worker --model DIR --endpoint ipc:///run/dinfer/w0.sock
    dinfer-worker --model DIR --endpoint tcp://127.0.0.1:5555
    dinfer-worker --model DIR --endpoint tcp://0.0.0.0:5555 --allow-remote  # $DINFER_SECRET

Loopback TCP and ipc:// need nothing more; binding any other interface needs --allow-remote and
a shared secret (read from an environment variable, never from the command line).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def check_endpoint(endpoint: str, allow_remote: bool, secret: str) -> str | None:
    """None if the endpoint may be bound, else the reason it may not."""
    if endpoint.startswith("ipc://"):
        return None
    if not endpoint.startswith("tcp://"):
        return f"--endpoint {endpoint!r}: use ipc://PATH or tcp://HOST:PORT"
    host = urlsplit(endpoint).hostname or ""
    if host in LOOPBACK or host.startswith("127."):
        return None
    if not allow_remote:
        return (
            f"--endpoint {endpoint!r} is not loopback: add --allow-remote (and a shared "
            "secret) to serve other hosts"
        )
    if not secret:
        return (
            "--allow-remote needs a shared secret: set --secret-env to an environment "
            "variable holding it"
        )
    return None


def exit_with_parent() -> None:
    """Ask Linux to send SIGTERM when the launching process dies (even mid-import), and turn
    SIGTERM into SystemExit so the worker's cleanup (its socket file) still runs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # not Linux (OSError, AttributeError): the serve loop's parent check still applies
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the request above took effect
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="dinfer-worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--model", default=None, help="local Hugging Face directory (default: the bundled model)"
    )
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"]
    )
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)"
    )
    ap.add_argument("--allow-remote", action="store_true")
    ap.add_argument(
        "--secret-env",
        default="DINFER_SECRET",
        help="environment variable holding the shared secret",
    )
    ap.add_argument(
        "--exit-with-parent", action="store_true", help="exit when the launching process is gone"
    )
    args = ap.parse_args(argv)
    if args.exit_with_parent:
        exit_with_parent()
    secret = os.environ.get(args.secret_env, "")
    problem = check_endpoint(args.endpoint, args.allow_remote, secret)
    if problem:
        print(f"dinfer-worker: {problem}", file=sys.stderr)
        return 2
    import torch

    from workers.worker import run_worker

    if args.threads:
        torch.set_num_threads(args.threads)
    run_worker(
        args.model,
        args.endpoint,
        args.device,
        args.dtype,
        args.max_batch_size,
        secret,
        args.exit_with_parent,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""dinfer-worker: one worker process serving a model over ZeroMQ.

    dinfer-worker --model DIR --endpoint ipc:///run/dinfer/w0.sock
    dinfer-worker --model DIR --endpoint tcp://127.0.0.1:5555
    dinfer-keys keys/      # once: a CURVE key pair for the worker and one for a client
    dinfer-worker --model DIR --endpoint tcp://0.0.0.0:5555 --allow-remote \\
        --curve-secret-key keys/server.key_secret --curve-authorized-clients keys/authorized_clients

Loopback TCP (127.0.0.0/8, ::1, localhost) and ipc:// need nothing more. Binding any other
interface needs --allow-remote and CURVE (every frame encrypted, the worker authenticated by its
key) plus a way to authenticate clients: their public keys (--curve-authorized-clients) or a
shared secret (read from an environment variable, never from the command line). Without CURVE
the secret and every prompt would cross the network in clear text, so that is refused.

A worker group (tensor parallel, README "Beyond one GPU"): T processes in one torch.distributed
group (gloo on CPU, NCCL on GPUs); rank 0 binds the endpoint, the others follow it.

    dinfer-worker --model DIR --endpoint ipc:///run/dinfer/w0.sock --tensor-parallel-size 2
    dinfer-worker ... --device cuda --gpus 4,5,6,7 --tensor-parallel-size 4 --enable-expert-parallel
    # two machines x 8 GPUs, one group of 16 (the same line on both, --node-rank 0 and 1):
    dinfer-worker ... --tensor-parallel-size 16 --device cuda --nnodes 2 --node-rank 0 \
        --master-addr 10.0.0.1 --master-port 29500
    torchrun --nproc-per-node 2 -m workers.main --model DIR --endpoint ipc:///tmp/w.sock

Started by hand, this process is rank 0 (or its node's first rank) and starts the node's other
ranks, which die with it; if one of them dies, the whole group exits (code 3), so a Client that
launched it restarts the group as one.

A start-up failure is one line on stderr naming the cause and the fix, exit code 2; --debug (or
DINFER_LOG_LEVEL=debug) adds the traceback. DINFER_LOG_LEVEL sets the log level (default info).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from urllib.parse import urlsplit

from dinfer_async import logs
from dinfer_async.cli import add_parallel_flags, expert_parallel, expert_parallel_problem, flag
from dinfer_async.transport import is_loopback
from workers.parallel import ranks

RANK_TIMEOUT = 300.0  # seconds: the default --rank-timeout

log = logging.getLogger("dinfer.worker")
MIN_FRAME_BYTES = 256 << 10  # the params and a short prompt must still fit


class StartupError(Exception):
    """The worker cannot start: `str(self)` names the cause and the fix, on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + message is two lines; make it one
        raise StartupError(f"{message}; see dinfer-worker --help")


def check_endpoint(
    endpoint: str,
    allow_remote: bool,
    secret: str,
    curve_secret_key: str | None = None,
    authorized_clients: str | None = None,
) -> str | None:
    """None if the endpoint may be bound, else the reason it may not (and the fix)."""
    if endpoint.startswith("ipc://"):
        return None if len(endpoint) > len("ipc://") else "--endpoint ipc:// needs a path"
    if not endpoint.startswith("tcp://"):
        return f"--endpoint {endpoint!r}: use ipc://PATH or tcp://HOST:PORT"
    try:
        parts = urlsplit(endpoint)
        host, port = parts.hostname or "", parts.port
    except ValueError as e:
        return f"--endpoint {endpoint!r} is not tcp://HOST:PORT ({e})"
    if port is None and not endpoint.endswith(":*"):
        return f"--endpoint {endpoint!r} has no port: use tcp://HOST:PORT"
    if is_loopback(host):
        return None
    if not allow_remote:
        return (
            f"--endpoint {endpoint!r} is not loopback: to serve other hosts add --allow-remote "
            "with CURVE keys (see dinfer-worker --help), or bind tcp://127.0.0.1:PORT"
        )
    if curve_secret_key is None:
        return (
            "--allow-remote needs CURVE encryption (without it the shared secret and every "
            "prompt cross the network in clear text): run `dinfer-keys DIR` and pass "
            "--curve-secret-key DIR/server.key_secret"
        )
    if authorized_clients is None and not secret:
        return (
            "--allow-remote needs client authentication (the server key alone only proves the "
            "worker): pass --curve-authorized-clients DIR/authorized_clients or set a shared "
            "secret in the environment variable named by --secret-env"
        )
    return None


def check_free(endpoint: str) -> str | None:
    """None if nothing listens on the endpoint (ZeroMQ would silently take over a live ipc
    socket, and a busy TCP port should fail before a model spends minutes loading)."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return f"{endpoint}: its directory does not exist; create it or pick another path"
        if not os.path.exists(path):
            return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                return None  # a stale socket file: binding replaces it
        return f"{endpoint} is in use by another process; stop it or pick another path"
    parts = urlsplit(endpoint)
    host = (parts.hostname or "").strip("[]")
    if parts.port in (None, 0) or host == "*" or not host:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds
        try:
            probe.bind((host, parts.port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (
                    f"{endpoint}: port {parts.port} is in use; pick another port or stop the "
                    "process holding it"
                )
            return None  # other problems (a name, an interface) are ZeroMQ's to report
    return None


def bind_problem(endpoint: str, e: Exception) -> str:
    import zmq

    code = getattr(e, "errno", None)
    if code == zmq.EADDRINUSE:
        return f"{endpoint} is in use; pick another port or stop the process holding it"
    if code == errno.ENOENT:
        return f"{endpoint}: its directory does not exist; create it or pick another path"
    if code == errno.EACCES:
        return f"{endpoint}: permission denied; pick a path or port this user may bind"
    if code in (errno.EINVAL, errno.ENODEV):
        return f"{endpoint} is not an address ZeroMQ can bind; use ipc://PATH or tcp://IP:PORT"
    return f"cannot bind {endpoint}: {e}"


def check_device(device: str, dtype: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise StartupError(
            f"--device {device!r} is not a device; use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU build)'}"
            raise StartupError(
                f"--device {device}: CUDA is not available on this machine ({build}); use "
                "--device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise StartupError(
                f"--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
            )
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise StartupError("--dtype bfloat16 is not supported by this GPU; use float16")
    elif dev.type != "cpu":
        raise StartupError(f"--device {device!r}: only cpu and cuda are supported")


def exit_with_parent() -> None:
    """Ask Linux to send SIGTERM when the launching process dies (even mid-import), and turn
    SIGTERM into SystemExit so the worker's cleanup (its socket file) still runs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # not Linux: the serve loop's parent check still applies
    ranks.die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the request above took effect
        sys.exit(0)


def setup_logging(debug: bool = False, rank: int = 0) -> bool:
    """The worker's logs on stderr as `dinfer-worker: ...` (`dinfer-worker rank R: ...` for the
    other ranks of a group) at DINFER_LOG_LEVEL (default info); True if at debug level."""
    prog = "dinfer-worker" if rank == 0 else f"dinfer-worker rank {rank}"
    return logs.setup_logging(prog=prog, debug=debug) <= logging.DEBUG


def rank_device(device: str, gpus: list[int] | None, p: ranks.Place) -> list[str]:
    """The device of each rank on this node, in local rank order."""
    if not device.startswith("cuda"):
        if gpus is not None:
            raise StartupError(f"--gpus is for --device cuda, not --device {device}")
        return [device] * p.local_size
    if device != "cuda":  # cuda:K
        if gpus is not None or p.local_size > 1:
            raise StartupError(
                f"--device {device} names one GPU; for {p.local_size} ranks on this node use "
                "--device cuda --gpus a,b,... (default: the first ones)"
            )
        return [device]
    chosen = list(range(p.local_size)) if gpus is None else gpus
    if len(chosen) != p.local_size:
        raise StartupError(
            f"--gpus lists {len(chosen)} GPU(s) but this node runs {p.local_size} rank(s) of the "
            "group (--tensor-parallel-size / --nnodes): list one GPU per rank"
        )
    return [f"cuda:{g}" for g in chosen]


def parser() -> argparse.ArgumentParser:
    from dinfer_async import __version__

    ap = _Parser(
        prog="dinfer-worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--model", default=None, help="local Hugging Face directory (default: the bundled model)"
    )
    ap.add_argument(
        "--endpoint",
        default=None,
        help="ipc://PATH or tcp://HOST:PORT to bind (required; only rank 0 of a group binds)",
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"]
    )
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)"
    )
    ap.add_argument(
        "--allow-remote", action="store_true", help="bind a non-loopback address (needs CURVE)"
    )
    ap.add_argument(
        "--secret-env",
        default="DINFER_SECRET",
        help="environment variable holding the shared secret",
    )
    ap.add_argument(
        "--curve-secret-key",
        metavar="FILE",
        help="the worker's CURVE .key_secret file (dinfer-keys writes one): encrypt every frame",
    )
    ap.add_argument(
        "--curve-authorized-clients",
        metavar="DIR",
        help="directory of client public keys (*.key); only these clients may connect",
    )
    ap.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help="longest prompt in characters, checked before tokenization "
        "(default: 16 x the model's max prompt length in tokens)",
    )
    ap.add_argument(
        "--max-frame-bytes",
        type=int,
        default=None,
        help="longest frame a peer may send; a longer one drops its connection (default: sized "
        "for the longest allowed prompt, 4 bytes a character + 9 a token + 1 MiB)",
    )
    ap.add_argument(
        "--steps-per-check",
        type=int,
        default=None,
        metavar="K",
        help="decoding steps between host checks of which requests are done (default "
        "$DINFER_STEPS_PER_CHECK or 1; on a GPU a few hide the host round trip; answers are the "
        "same)",
    )
    ap.add_argument(
        "--exit-with-parent", action="store_true", help="exit when the launching process is gone"
    )
    add_parallel_flags(
        ap,
        size_default=None,
        gpus_help="with --device cuda: this node's GPUs, one per rank of the group on it "
        "(default: 0,1,..)",
    )
    group = ap.add_argument_group("several machines (torchrun-compatible; or run under torchrun)")
    group.add_argument("--nnodes", type=int, default=1, help="machines the group spans")
    group.add_argument("--node-rank", type=int, default=0, help="this machine's number, from 0")
    group.add_argument(
        "--master-addr", default=None, help="node 0's address (default 127.0.0.1 on one machine)"
    )
    group.add_argument(
        "--master-port", type=int, default=None, help="a free port on node 0 (default: any)"
    )
    ap.add_argument(
        "--rank-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a group's step still running after this long means a rank is hung: rank 0 exits "
        f"(code {ranks.FAILED_EXIT}) so the group is restarted; 0 turns it off (default "
        f"$DINFER_RANK_TIMEOUT or {RANK_TIMEOUT:.0f}; keep it above the slowest step)",
    )
    ap.add_argument("--debug", action="store_true", help="tracebacks for start-up failures")
    ap.add_argument("--version", action="version", version=f"dinfer-worker {__version__}")
    return ap


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    ranks.die_with_starter()  # first: a rank another dinfer-worker started dies with it
    if "--exit-with-parent" in given and ranks.SPAWNED not in os.environ:
        exit_with_parent()  # first: the launcher may die while we start
    rank = os.environ.get("RANK", "0")
    debug = setup_logging("--debug" in given, int(rank) if rank.isdigit() else 0)
    with contextlib.ExitStack() as cleanup:
        code = _run(given, debug, cleanup)
    if code == ranks.FAILED_EXIT:  # the group is broken: skip torch's teardown of it (slow)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(given: list[str], debug: bool, cleanup: contextlib.ExitStack) -> int:
    try:
        args = parser().parse_args(given)
        worker = start(args, given, cleanup)
    except StartupError as e:
        _startup_error(str(e), debug)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # any other start-up failure: still one line, the cause named
        text = f"could not start: {type(e).__name__}: {e}; rerun with --debug for the traceback"
        _startup_error(text, debug)
        return 2
    from workers.worker import GroupFailed

    devices = ", ".join(worker.devices)
    if args.enable_expert_parallel:
        devices += f"; experts split over the ranks, {args.expert_parallel_dispatch}"
    if worker.endpoint:
        log.info("serving %s on %s (%s)", worker.engine.name, worker.endpoint, devices)
    tp = worker.engine.tensor_parallel
    if tp is not None and tp.rank == 0 and args.rank_timeout > 0:
        from workers.parallel.spmd import watch_steps

        watch_steps(lambda: worker.scheduler, args.rank_timeout, tp.size)
    try:
        worker.serve(os.getppid() if args.exit_with_parent else None)
    except KeyboardInterrupt:
        return 130
    except GroupFailed as e:  # a rank of the group is gone: every rank stops
        log.error("%s", e, exc_info=debug)
        return ranks.FAILED_EXIT
    finally:
        worker.close()
    return 0


def _startup_error(message: str, debug: bool) -> None:
    """One line on stderr; a rank started by rank 0 hands it over instead (rank 0 says it once,
    for the whole group), unless at debug level."""
    if ranks.report_startup_error(message) and not debug:
        return
    log.error("%s", message, exc_info=debug)


def start(
    args: argparse.Namespace,
    argv: list[str] | None = None,
    cleanup: contextlib.ExitStack | None = None,
):
    """Check everything that can be checked cheaply, start the group's other ranks on this node
    (stopped by `cleanup`), then load the model and bind (rank 0) or follow (the others)."""
    try:
        p = ranks.place(
            args.tensor_parallel_size,
            args.nnodes,
            args.node_rank,
            args.master_addr,
            args.master_port,
        )
    except ValueError as e:
        raise StartupError(str(e)) from None
    if p.rank:
        setup_logging(args.debug, p.rank)
    problem = expert_parallel_problem(args.enable_expert_parallel, p.size)
    if problem:
        raise StartupError(problem)
    if p.rank == 0:
        check_serving(args)
    args.rank_timeout = rank_timeout(args.rank_timeout)
    for name in ("max_batch_size", "max_prompt_chars", "steps_per_check"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise StartupError(f"{flag(name)} {value} must be >= 1")
    devices = rank_device(args.device, args.gpus, p)
    for device in devices if p.local_rank == 0 else devices[p.local_rank : p.local_rank + 1]:
        check_device(device, args.dtype)
    device = devices[p.local_rank]
    if p.size > 1 and p.rank == 0:  # refuse a split the model cannot take before starting ranks
        check_split(args.model, p.size)
    local: ranks.LocalRanks | None = None
    if p.starts_others:
        local = ranks.LocalRanks(p, sys.argv[1:] if argv is None else argv)
        if cleanup is not None:
            cleanup.callback(local.stop)
    import torch
    import zmq

    from workers.engine import Engine
    from workers.errors import ModelLoadError
    from workers.worker import Follower, Worker

    if args.threads:
        torch.set_num_threads(args.threads)
    elif p.size > 1 and device == "cpu":  # the node's cores shared between its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // p.local_size))
    names = [device]
    if p.size > 1:
        from workers.parallel.group import gather_names, init_group

        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        init_group(p.rank, p.size, p.master_addr, p.master_port, backend)
        names = gather_names(f"{socket.gethostname()}/{device}")
        if len({n.split("/")[0] for n in names}) == 1:  # one machine: the devices say enough
            names = [n.split("/", 1)[1] for n in names]
    try:
        engine = Engine.from_pretrained(
            args.model,
            device=device,
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
            tensor_parallel_size=p.size,
            expert_parallel=expert_parallel(args),
            steps_per_check=args.steps_per_check,
        )
    except ModelLoadError as e:
        raise StartupError(f"--model: {e}") from e
    except (ValueError, NotImplementedError) as e:  # the model cannot be split that way
        if p.size == 1:
            raise
        raise StartupError(f"--tensor-parallel-size {p.size}: {e}") from e
    if local is not None:
        local.starting = False
    if p.rank:
        return Follower(engine, names)
    from dinfer_async.transport import KeyFileError

    try:
        return Worker(
            engine,
            args.endpoint,
            os.environ.get(args.secret_env, ""),
            max_prompt_chars=args.max_prompt_chars,
            max_frame_bytes=args.max_frame_bytes,
            curve_secret_key=args.curve_secret_key,
            authorized_clients=args.curve_authorized_clients,
            devices=names,
        )
    except KeyFileError as e:
        raise StartupError(str(e)) from e
    except zmq.ZMQError as e:
        raise StartupError(bind_problem(args.endpoint, e)) from e


def rank_timeout(given: float | None, env: dict[str, str] | None = None) -> float:
    """--rank-timeout, else $DINFER_RANK_TIMEOUT (how a Client's workers get it), else the
    default; StartupError naming the one that is wrong."""
    env = dict(os.environ) if env is None else env
    name, value = "--rank-timeout", given
    if value is None and "DINFER_RANK_TIMEOUT" in env:
        name = "DINFER_RANK_TIMEOUT"
        try:
            value = float(env[name])
        except ValueError:
            value = float("nan")
    if value is None:
        return RANK_TIMEOUT
    if not value >= 0:  # NaN too
        shown = env.get(name, value)
        raise StartupError(f"{name} {shown} must be a number of seconds >= 0 (0: no bound)")
    return value


def check_split(model: str | None, size: int) -> None:
    """The model's heads split over `size` ranks (from its config.json alone)."""
    from workers.errors import ModelLoadError
    from workers.hub import resolve_model
    from workers.known_fields import fill_known_fields
    from workers.loader import read_config
    from workers.models import FAMILIES, family_name
    from workers.parallel.group import TensorParallel
    from workers.parallel.shard import head_split

    try:
        raw = read_config(resolve_model(model))
        family = family_name(raw)
        if family is None:
            return  # the load reports it
        config = FAMILIES[family][0].from_dict(fill_known_fields(raw, family))
        heads, kv_heads = int(config.n_heads), int(config.n_kv_heads)
    except (ModelLoadError, AttributeError, TypeError, ValueError, KeyError):
        return  # the load reports what is wrong with the model
    try:
        head_split(heads, kv_heads, TensorParallel(None, 0, size))  # type: ignore[arg-type]
    except ValueError as e:
        raise StartupError(f"--tensor-parallel-size {size}: {e}") from None


def check_serving(args: argparse.Namespace) -> None:
    """Rank 0's checks of what it binds and the keys it serves with."""
    from dinfer_async.transport import KeyFileError, load_key_pair

    if args.endpoint is None:
        raise StartupError(
            "--endpoint is required (on rank 0 of a group: the node with --node-rank 0): "
            "give ipc://PATH or tcp://127.0.0.1:PORT"
        )
    secret = os.environ.get(args.secret_env, "")
    problem = check_endpoint(
        args.endpoint,
        args.allow_remote,
        secret,
        args.curve_secret_key,
        args.curve_authorized_clients,
    ) or check_free(args.endpoint)
    if problem:
        raise StartupError(problem)
    if args.max_frame_bytes is not None and args.max_frame_bytes < MIN_FRAME_BYTES:
        raise StartupError(f"--max-frame-bytes {args.max_frame_bytes} must be >= {MIN_FRAME_BYTES}")
    try:
        if args.curve_secret_key is not None:
            load_key_pair(args.curve_secret_key)
    except KeyFileError as e:
        raise StartupError(f"--curve-secret-key: {e}") from e


if __name__ == "__main__":
    sys.exit(main())

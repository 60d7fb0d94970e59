"""A worker group's processes: where this one sits (rank, node, rendezvous), starting the other
ranks of this node, and failing the whole group when one of them dies.

No torch here: the place is worked out (and refused, with the fix) before anything heavy loads.

Three ways a group comes to be:
- one machine, by hand or by the Client: `dinfer-worker --tensor-parallel-size T` is rank 0 and
  starts ranks 1..T-1 itself, as children that die with it (PR_SET_PDEATHSIG, SIGKILL);
- several machines: `--nnodes N --node-rank K --master-addr A --master-port P` on each; the
  process on node K is rank K*T/N and starts the node's other T/N - 1 ranks the same way;
- under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment):
  every rank is torchrun's, nothing is started here, and torchrun stops the group on a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("dinfer.worker")
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SPAWNED = "DINFER_GROUP_PARENT"  # set on the ranks a dinfer-worker started: its pid
ERRORS = "DINFER_GROUP_ERROR_FD"  # where such a rank writes its start-up error, for rank 0
POLL = 0.1  # seconds between looks at the child ranks (a death is noticed within this)
FAILED_EXIT = 3  # a rank's death ends its group with this code


@dataclass(frozen=True)
class Place:
    """This process in its group."""

    rank: int
    size: int  # ranks in the group (= tensor_parallel_size)
    local_rank: int
    local_size: int  # ranks on this node
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int
    torchrun: bool = False  # the ranks are torchrun's
    spawned: bool = False  # a dinfer-worker of this node started this process

    @property
    def starts_others(self) -> bool:
        """Local rank 0 of a group it launches itself starts the node's other ranks."""
        return not self.torchrun and not self.spawned and self.local_size > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def place(
    tensor_parallel_size: int | None,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Place:
    """Where this process sits, from torchrun's environment if it is there, else from the flags;
    ValueError naming the flag and the fix."""
    env = os.environ if env is None else env
    if all(name in env for name in TORCHRUN):
        size = _int_env(env, "WORLD_SIZE")
        if tensor_parallel_size not in (None, size):
            raise ValueError(
                f"--tensor-parallel-size {tensor_parallel_size} but WORLD_SIZE={size} (torchrun's "
                "--nnodes x --nproc-per-node): make them equal, or leave the flag out"
            )
        local_size = _int_env(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else size
        rank, local = _int_env(env, "RANK"), _int_env(env, "LOCAL_RANK")
        return Place(
            rank=rank,
            size=size,
            local_rank=local,
            local_size=local_size,
            node_rank=rank // max(local_size, 1),
            nnodes=max(1, size // max(local_size, 1)),
            master_addr=env["MASTER_ADDR"],
            master_port=_int_env(env, "MASTER_PORT"),
            torchrun=SPAWNED not in env,
            spawned=SPAWNED in env,
        )
    size = 1 if tensor_parallel_size is None else tensor_parallel_size
    if size < 1:
        raise ValueError(f"--tensor-parallel-size {size} must be >= 1")
    if nnodes < 1:
        raise ValueError(f"--nnodes {nnodes} must be >= 1")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} must be in 0..{nnodes - 1} (--nnodes {nnodes})")
    if size % nnodes:
        raise ValueError(
            f"--tensor-parallel-size {size} over --nnodes {nnodes}: every node runs the same "
            "number of ranks, so the size must be a multiple of the nodes"
        )
    if nnodes > 1 and (master_addr is None or master_port is None):
        raise ValueError(
            f"--nnodes {nnodes} needs --master-addr and --master-port: the address of node 0 "
            "and a free port there, the same on every node"
        )
    if master_port is not None and not 0 < master_port < 65536:
        raise ValueError(f"--master-port {master_port} must be in 1..65535")
    local_size = size // nnodes
    return Place(
        rank=node_rank * local_size,
        size=size,
        local_rank=0,
        local_size=local_size,
        node_rank=node_rank,
        nnodes=nnodes,
        master_addr=master_addr or "127.0.0.1",
        master_port=master_port if master_port is not None else free_port(),
    )


def report_startup_error(message: str, env: Mapping[str, str] | None = None) -> bool:
    """In a started rank: hand the start-up error to the starter, which says it on its one line
    (or says its own, the same, error); False if this rank was not started by a dinfer-worker."""
    env = os.environ if env is None else env
    fd = env.get(ERRORS)
    if fd is None or SPAWNED not in env:
        return False
    line = f"{env.get('RANK', '?')}\t{' '.join(message.split())}"[:4000] + "\n"
    try:
        os.write(int(fd), line.encode(errors="replace"))
    except (OSError, ValueError):
        return False
    return True


def child_env(p: Place, local_rank: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of local rank `local_rank` started by this node's first rank: torchrun's
    variables, and who started it (so it dies with that process)."""
    out = dict(os.environ if env is None else env)
    out.update(
        RANK=str(p.rank + local_rank),
        WORLD_SIZE=str(p.size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(p.local_size),
        GROUP_RANK=str(p.node_rank),
        MASTER_ADDR=p.master_addr,
        MASTER_PORT=str(p.master_port),
        OMP_NUM_THREADS=out.get("OMP_NUM_THREADS", "1"),
    )
    out[SPAWNED] = str(os.getpid())
    return out


def child_argv(argv: list[str]) -> list[str]:
    """A started rank runs the same command line; it dies with its starter, not the client."""
    return [sys.executable, "-m", "workers.main", *(a for a in argv if a != "--exit-with-parent")]


def die_with_parent(sig: int) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (elsewhere: nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG


def die_with_starter(env: Mapping[str, str] | None = None) -> None:
    """In a rank a dinfer-worker started: SIGKILL when the starter dies (a rank waiting inside
    a collective would never run a Python signal handler), or exit now if it is already gone."""
    env = os.environ if env is None else env
    starter = env.get(SPAWNED)
    if starter is None:
        return
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the starter's to act on
    if str(os.getppid()) != starter:
        os._exit(FAILED_EXIT)


class LocalRanks:
    """The ranks this process started on its node; a watcher thread ends this process (and so,
    through PDEATHSIG, the others) as soon as one of them exits."""

    def __init__(self, p: Place, argv: list[str], on_failure: Callable[[int], None] = os._exit):
        """on_failure(exit code): what ends this process when a rank dies (tests: a record)."""
        self.place, self.on_failure = p, on_failure
        self.procs: dict[int, subprocess.Popen] = {}
        self.starting = True  # while True, a failed rank leaves time for our own error line
        self.stopping = False
        self.errors_r, errors_w = os.pipe()
        os.set_blocking(self.errors_r, False)
        self.errors: dict[int, str] = {}
        cmd = child_argv(argv)
        try:
            for local in range(1, p.local_size):
                env = child_env(p, local)
                env[ERRORS] = str(errors_w)
                self.procs[p.rank + local] = subprocess.Popen(
                    cmd, env=env, stdin=subprocess.DEVNULL, pass_fds=(errors_w,)
                )
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(errors_w)
        self.thread = threading.Thread(target=self._watch, name="dinfer-ranks", daemon=True)
        self.thread.start()

    @property
    def pids(self) -> dict[int, int]:
        return {rank: proc.pid for rank, proc in self.procs.items()}

    def _watch(self) -> None:
        while not self.stopping:
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code is None or code == 0 or self.stopping:
                    continue  # 0: released by rank 0 (`follow` returned), the group is stopping
                if self.starting:  # its start-up error is probably ours too: let us say it
                    time.sleep(2.0)
                    if self.stopping:
                        return
                said = self.startup_errors().get(rank)
                if said is not None:
                    log.error("rank %d could not start: %s", rank, said)
                else:
                    log.error(
                        "rank %d (pid %d) exited with code %s %s: the group of %d ranks stops",
                        rank,
                        proc.pid,
                        code,
                        "while starting" if self.starting else "while serving",
                        self.place.size,
                    )
                self.kill()
                self.on_failure(2 if self.starting else FAILED_EXIT)
                return
            time.sleep(POLL)

    def startup_errors(self) -> dict[int, str]:
        """The start-up errors the ranks reported so far, by rank."""
        with contextlib.suppress(OSError):
            data = b""
            while chunk := os.read(self.errors_r, 1 << 16):
                data += chunk
            for line in data.decode(errors="replace").splitlines():
                rank, _, message = line.partition("\t")
                if rank.isdigit():
                    self.errors.setdefault(int(rank), message)
        return self.errors

    def kill(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def stop(self, grace: float = 2.0) -> None:
        """End the started ranks: they may leave on their own (a released `follow`) within
        `grace` seconds, then they are killed."""
        self.stopping = True
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        self.kill()
        for proc in self.procs.values():
            proc.wait()
        with contextlib.suppress(OSError):
            os.close(self.errors_r)

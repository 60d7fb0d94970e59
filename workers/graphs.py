"""Graph-captured block steps (issue 15, item 1): a round's steps after the first as CUDA graphs.

On a GPU a block step is launch-bound (an 8B-shaped forward: 16-33 ms eager, 6.8 ms replayed
from a CUDA graph), so the steps of a block after its first (the cache refresh, whose shape
varies) run as a static-shape callable: `BlockRound._decode` over static copies of every tensor
the step reads or writes. Per step:

1. The key: every host value the step reads (the round's, batch's, decoders' and cache policy's
   plain attributes: step index, block start and length, flags, decoder options), the shape and
   dtype of every tensor attribute, the chunk layout, the model and the KV storage (its address,
   rows and length). Two steps with one key run the same kernels on the same shapes.
2. Its entry holds a static copy of each tensor attribute (the "slots"; shared by the keys
   with the same slots, i.e. every step index of a layout). The live values are copied in
   (those that changed since), the step runs over the static copies (swapped into the objects'
   attributes), and what the step wrote is copied back into the live tensors.
3. On CUDA a key's first call runs eagerly (one-off shapes are not worth a capture); its
   second warms up on a side stream and captures that step into a `torch.cuda.CUDAGraph` (one
   memory pool shared by every graph; an LRU of `limit` graphs); later calls copy in, replay,
   copy out. Elsewhere (the CPU, `DINFER_CUDA_GRAPHS=static`) the callable runs eagerly over
   the same static copies ("static mode"): what the CPU tests check, with a stand-in for the
   graph that replays a step as captured (its round, host values and static copies).

The step index is part of the key (the fixed decoder's schedule and the step's noise keys are
host values of it), so a key is one step of blocks with the same layout. To let one graph serve
blocks at different positions, a round with graphs on lays its columns out in multiples of
`COLUMNS` (`Batch(align=)`: the block start and the length rounded up, with more padding
before the block and at the end, hidden from attention), so the blocks of a request whose
starts round to the same multiple share graphs (COLUMNS / block_length blocks each).
Batch sizes are not padded: a key has the round's exact row count (at most max_batch_size).
Eager instead (no graph, no static copies): the first step of a block; rounds whose rows use
more than one decoder (the rows of each are index tensors with no host copy to key on); the
credit decoder (its [B, K, V] float64 credit, written every step, would be copied out each); tensor
parallel groups (collectives inside a graph are unchecked); and any key whose capture failed
(e.g. a host sync in the MoE loop path; said on stderr).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch

from workers.cache import NoCache
from workers.kv_cache import KVCache
from workers.parallel.group import current

if TYPE_CHECKING:
    from workers.iteration import BlockRound

COLUMNS = 64  # a graphed round's block start and length are padded to multiples of this
LIMIT = 256  # graphs kept (least recently used dropped first)
MODES = ("off", "on", "static")

# plain attributes that change every step without changing what the step computes
_NOT_KEYED = {"fed", "fed_real", "finished"}

log = logging.getLogger("workers.graphs")


def resolve_mode(value: bool | str | None = None) -> str:
    """ "off", "on" (CUDA graphs on a GPU, static mode elsewhere) or "static" (static mode
    everywhere): `value` (True is "on", False "off"), or $DINFER_CUDA_GRAPHS when None."""
    if value is None:
        text = os.environ.get("DINFER_CUDA_GRAPHS", "0").strip().lower()
        named = {"": "off", "0": "off", "1": "on", "off": "off", "on": "on", "static": "static"}
        if text not in named:
            raise ValueError(f"DINFER_CUDA_GRAPHS={text!r}: set 0, 1 or static, or unset it")
        return named[text]
    if value is True or value is False:
        return "on" if value else "off"
    if value not in MODES:
        raise ValueError(f"cuda_graphs={value!r}: use True, False, 'on', 'off' or 'static'")
    return str(value)


class _Static:
    """Static copies of a round's tensors, shared by the keys whose slots have the same names,
    shapes and dtypes (the steps of one layout at every step index), so a step's graph reads
    the state the previous step's graph wrote in place. `synced`: per slot, the live tensor and
    its version counter when the copy last equalled it: an unchanged input is not copied again
    (a launch saved per slot and step)."""

    def __init__(self, slots: Slots):
        self.tensors = [live.clone() for _, live in slots]
        self.synced: list[tuple[torch.Tensor, int] | None] = [None] * len(slots)


class _Entry:
    """One key's static copies, what the step left in each attribute (and whether it wrote
    it), its graph (CUDA) and the host padding counts it made (Batch._count_fed calls, replayed
    on the host)."""

    def __init__(self, static: _Static):
        self.shared = static
        self.static = static.tensors
        self.out: list[torch.Tensor] = []
        self.written: list[bool] = []
        self.graph: Any = None
        self.counted: list[tuple] = []

    @property
    def synced(self) -> list[tuple[torch.Tensor, int] | None]:
        return self.shared.synced

    @synced.setter
    def synced(self, value: list[tuple[torch.Tensor, int] | None]) -> None:
        self.shared.synced = value


def _version(t: torch.Tensor) -> int | None:
    """t's in-place write counter (None where torch keeps none: inference tensors)."""
    try:
        return t._version
    except RuntimeError:
        return None


class StepGraphs:
    """Static-shape block steps, shared by every round of a scheduler (one round runs at a
    time). `step(round)` runs the round's next step: graphed (CUDA), static (elsewhere) or
    eager (see the module docstring for which)."""

    def __init__(self, device: torch.device, mode: str = "on", limit: int = LIMIT):
        self.mode = mode
        self.capture = mode == "on" and torch.device(device).type == "cuda"
        self.limit = limit
        self.entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.failed: set[Hashable] = set()
        self.seen: set[Hashable] = set()  # keys run once, eagerly (CUDA)
        self.statics: dict[Hashable, _Static] = {}
        self.pool: Any = torch.cuda.graph_pool_handle() if self.capture else None
        # what ran, for tests and benchmarks
        self.counts = {"eager": 0, "static": 0, "captured": 0, "replayed": 0, "failed": 0}
        self.kv: KVCache | None = None
        # tests: static steps overwrite the live tensors with garbage while they run, so a
        # step that reads one other than through its slot (which a graph would not see) fails
        self.poison = False

    def kv_cache(self, config: Any, device: torch.device, dtype: torch.dtype) -> KVCache:
        """One KV storage for every scheduler using these graphs (an Engine makes one per
        generate call): graphs hold its address, so a new one would capture everything anew."""
        kv = self.kv
        if kv is None or kv.config is not config or kv.device != device or kv.dtype != dtype:
            self.kv = kv = KVCache(config, device, dtype)
        return kv

    def step(self, round: BlockRound) -> None:
        if not _eligible(round):
            self._eager(round)
            return
        slots = _slots(round)
        # which attributes share a tensor is part of the key: the static copies are per slot
        key = (_key(round), tuple(tuple(name for _, name in owners) for owners, _ in slots))
        if key in self.failed:
            self._eager(round)
            return
        entry = self.entries.get(key)
        if entry is not None and entry.graph is not None:
            self.entries.move_to_end(key)
            self._replay(round, slots, entry)
            return
        # a key's first step runs eagerly: a shape met once (e.g. after rows left mid-block)
        # is not worth a capture; one met again is
        if self.capture and key not in self.seen:
            if len(self.seen) > 16 * self.limit:
                self.seen.clear()
            self.seen.add(key)
            self._eager(round)
            return
        if entry is None:
            entry = _Entry(self._static_for(slots))
            self.entries[key] = entry
            while len(self.entries) > self.limit:
                self.entries.popitem(last=False)
                if len(self.statics) > self.limit:  # drop the copies no entry uses
                    used = {id(e.shared) for e in self.entries.values()}
                    self.statics = {k: v for k, v in self.statics.items() if id(v) in used}
        if not self.capture:
            self._static(round, slots, entry)
            return
        try:
            self._capture(round, slots, entry)
        except Exception as e:  # a step that cannot be captured runs eagerly from now on
            self.entries.pop(key, None)
            entry.shared.synced = [None] * len(slots)  # a warm-up may have left them changed
            self.failed.add(key)
            self.counts["failed"] += 1
            log.warning("no CUDA graph for a block step (%s: %s); eager", type(e).__name__, e)
            self._eager(round)

    def _static_for(self, slots: Slots) -> _Static:
        """The static copies for slots of these names, shapes, dtypes and devices."""
        signature = tuple(
            (tuple(owners), tuple(live.shape), live.dtype, live.device)
            for owners, live in [([n for _, n in o], t) for o, t in slots]
        )
        if signature not in self.statics:
            self.statics[signature] = _Static(slots)
        return self.statics[signature]

    def _eager(self, round: BlockRound) -> None:
        self.counts["eager"] += 1
        round._decode()

    def _run(self, round: BlockRound, slots: Slots, entry: _Entry, fn: Callable[[], None]) -> None:
        """fn() with the static copies in the slots' attributes; entry.out: what they held after;
        the padding counts recorded, not counted; the live attributes and step index restored."""
        t = round.step_index
        batch = round.batch
        counted: list[tuple] = []
        batch._count_fed = lambda *args: counted.append(args)  # type: ignore[method-assign]
        for (owners, _), static in zip(slots, entry.static):
            for obj, name in owners:
                setattr(obj, name, static)
        versions = [_version(static) for static in entry.static]
        try:
            fn()
            entry.out = [getattr(*owners[0]) for owners, _ in slots]
            entry.written = [
                out is not static or v is None or _version(static) != v
                for out, static, v in zip(entry.out, entry.static, versions)
            ]
        finally:
            for owners, live in slots:
                for obj, name in owners:
                    setattr(obj, name, live)
            del batch._count_fed
            round.step_index = t
        entry.counted = counted

    def _copy_in(self, slots: Slots, entry: _Entry, force: bool = False) -> None:
        for i, ((_, live), static) in enumerate(zip(slots, entry.static)):
            synced = entry.synced[i]
            version = _version(live)
            if force or synced is None or synced[0] is not live or synced[1] != version:
                static.copy_(live)
                version = _version(live)
                entry.synced[i] = None if version is None else (live, version)

    def _finish(self, round: BlockRound, slots: Slots, entry: _Entry) -> None:
        """Copy the step's results into the live tensors (an attribute the step replaced by one
        of another shape, e.g. DecoderSet.confidence after rows left, takes a copy); count what
        it fed; next step."""
        for i, ((owners, live), out) in enumerate(zip(slots, entry.out)):
            if not entry.written[i]:
                continue
            if out.shape == live.shape:
                live.copy_(out)
            else:
                for obj, name in owners:
                    setattr(obj, name, out.clone())
            # the static copy equals the live tensor now only if the step wrote it in place
            version = _version(live)
            in_place = out is entry.static[i] and out.shape == live.shape and version is not None
            entry.synced[i] = (live, version) if in_place else None  # type: ignore[assignment]
        for args in entry.counted:
            round.batch._count_fed(*args)
        round.step_index += 1

    def _static(self, round: BlockRound, slots: Slots, entry: _Entry) -> None:
        self.counts["static"] += 1
        self._copy_in(slots, entry)
        saved = [live.clone() for _, live in slots] if self.poison else []
        for _, live in saved and slots:
            live.fill_(True if live.dtype == torch.bool else -(2**30))
        self._run(round, slots, entry, round._decode)
        for (_, live), value in zip(slots, saved):
            live.copy_(value)
        self._finish(round, slots, entry)

    def _capture(self, round: BlockRound, slots: Slots, entry: _Entry) -> None:
        """Warm up (the step's own kernels, autotuning, workspaces), then capture; capturing
        runs nothing, so the step itself is the graph's first replay. A warm-up writes the
        block's own keys into the cache, as the replay does again."""
        self._copy_in(slots, entry, force=True)
        self._run(round, slots, entry, lambda: self._warm_up(round._decode))
        self._copy_in(slots, entry, force=True)  # the warm-up changed the static state
        graph = self._new_graph()
        self._run(round, slots, entry, lambda: self._record(graph, round._decode))
        entry.graph = graph
        entry.synced = [None] * len(slots)  # (a stand-in for a graph may run when recording)
        self.counts["captured"] += 1
        self._replay(round, slots, entry, count=False)

    # the CUDA parts, one each (tests stand in for them on a CPU: tests/test_graphs.py)
    def _warm_up(self, fn: Callable[[], None]) -> None:
        """fn() on a side stream, as torch asks before a capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def _new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def _record(self, graph: Any, fn: Callable[[], None]) -> None:
        """Capture fn() into `graph`. Entering a capture synchronizes the device itself: not
        the step's sync, which the warm-up ran under the step region's check."""
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    def _replay(self, round: BlockRound, slots: Slots, entry: _Entry, count: bool = True) -> None:
        if count:
            self.counts["replayed"] += 1
        self._copy_in(slots, entry)
        entry.graph.replay()
        self._finish(round, slots, entry)


def _eligible(round: BlockRound) -> bool:
    groups = round.decoders.groups
    return (
        round.fresh == len(round.seqs)  # no row at its block's first step (nor the round's)
        and current() is None
        and len(groups) == 1
        and type(groups[0][1]).__name__ != "CreditDecoder"
    )


Slots = list[tuple[list[tuple[Any, str]], torch.Tensor]]


def _objects(round: BlockRound) -> list[tuple[str, Any]]:
    """The objects whose attributes a step reads and writes, named for the key."""
    batch, decoders = round.batch, round.decoders
    objects: list[tuple[str, Any]] = [
        ("round", round),
        ("batch", batch),
        ("guidance", batch.guidance),
        ("decoders", decoders),
        ("policy", round.policy),
    ]
    objects += [(f"decoder{i}", d) for i, (_, d) in enumerate(decoders.groups)]
    return objects


def _slots(round: BlockRound) -> Slots:
    """([(object, attribute), ...], live tensor) for every tensor attribute of the step's
    objects: a tensor held by several attributes is one slot, so they keep sharing it."""
    slots: dict[int, tuple[list[tuple[Any, str]], torch.Tensor]] = {}
    for _, obj in _objects(round):
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                slots.setdefault(id(value), ([], value))[0].append((obj, name))
    return list(slots.values())


def _key(round: BlockRound) -> Hashable:
    """Everything on the host that decides what the step computes (see the module docstring)."""
    parts: list[Hashable] = []
    for label, obj in _objects(round):
        parts.append(label)
        parts.append(type(obj).__name__)
        for name, value in vars(obj).items():
            if name in _NOT_KEYED:
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                parts.append((name, value))
            elif isinstance(value, torch.Tensor):
                parts.append((name, tuple(value.shape), value.dtype))
    batch = round.batch
    if isinstance(round.policy, NoCache):  # its steps run Batch.run_full, in these chunks
        parts.append(tuple(batch.chunks()))
    parts.append(tuple(batch.guidance.host_rows))
    parts.append(id(batch.model))
    kv = getattr(round.policy, "kv", None)
    if kv is not None and kv.k.dim() == 5:
        parts.append((kv.k.data_ptr(), kv.v.data_ptr(), tuple(kv.k.shape), kv.rows, kv.length))
    return tuple(parts)

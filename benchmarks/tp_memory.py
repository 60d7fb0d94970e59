"""Peak host memory per rank while loading a checkpoint: one process, tensor parallel with the old
path (every rank loads the whole model, then shard_model keeps its slice) and with shard-only
loading (each rank reads just its slices from the safetensors files, workers.loader).

    python benchmarks/tp_memory.py                       # ~350 MB bf16 LLaDA-shaped checkpoint
    python benchmarks/tp_memory.py --layers 16 --sizes 1,2 --dtypes bfloat16

A random LLaDA-shaped checkpoint is written in bf16 (as models are released) to a temp dir, in
100 MB files with an index. Every row runs in fresh processes (gloo, on this machine) and
reports per rank (the largest rank's): the peak of private memory (RssAnon of
/proc/self/status, sampled every millisecond while loading) over its value before loading, the
peak resident set (VmHWM) over its value before, and the parameter bytes the model holds.
safetensors maps the files into memory: file pages a rank touches count in its VmHWM while
mapped, but they are the page cache, shared by the ranks and dropped under pressure, so the
private peak is what T ranks on one host pay T times. Loading into the files' own dtype on CPU
keeps whole tensors as views of that mapping (nothing private), which is why the old path's
cost shows when loading casts (and on GPUs, where every rank's device got the whole model).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import threading
import time
from pathlib import Path

import torch
from shapes import add_llada_shape_flags, llada_raw_config

from workers.loader import load_model, resolve_dtype, save_model
from workers.models.llada import LLaDAConfig, LLaDAModel
from workers.parallel.group import launch


def status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


class PeakAnon:
    """The highest RssAnon seen by a thread polling every `every` seconds until stop()."""

    def __init__(self, every: float = 0.001):
        self.peak, self.every = status_mb("RssAnon"), every
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        while not self.done.wait(self.every):
            self.peak = max(self.peak, status_mb("RssAnon"))

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return max(self.peak, status_mb("RssAnon"))


def write_checkpoint(path: Path, args: argparse.Namespace) -> int:
    """A seeded random checkpoint in bf16; returns its bytes."""
    with torch.device("meta"):
        model = LLaDAModel(LLaDAConfig.from_dict(llada_raw_config(args)))
    gen = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        value = torch.randn(p.shape, generator=gen, dtype=torch.bfloat16) * 0.02
        model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(value)
    save_model(model, path, llada_raw_config(args), max_shard_bytes=100 << 20)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(rank: int, size: int, mode: str, path: str, dtype: str, out: str) -> None:
    from workers.parallel.group import join
    from workers.parallel.shard import shard_model

    load_model(Path(path).parent / "warm-up", dtype=dtype)  # first-load costs (~75 MB), not ours
    before, anon = status_mb("VmHWM"), status_mb("RssAnon")
    sampler = PeakAnon()
    start = time.perf_counter()
    if mode == "one":
        model = load_model(path, dtype=dtype)
    elif mode == "old":
        model = shard_model(load_model(path, dtype=dtype), join(size))
    else:
        model = load_model(path, dtype=dtype, tensor_parallel=join(size))
    seconds = time.perf_counter() - start
    row = dict(
        private=sampler.stop() - anon,
        peak=status_mb("VmHWM") - before,
        params=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        seconds=seconds,
    )
    Path(out, f"{rank}.json").write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,2,4")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    add_llada_shape_flags(ap, d_model=1024, heads=16, layers=8, mlp=3072, vocab=32000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp, "model")
        total = write_checkpoint(ckpt, args) / 2**20
        small = dict(d_model=64, heads=4, layers=1, mlp=128, vocab=256)
        write_checkpoint(Path(tmp, "warm-up"), argparse.Namespace(**small))
        print(
            f"random LLaDA: d_model {args.d_model}, {args.heads} heads, {args.layers} layers, "
            f"mlp {args.mlp}, vocab {args.vocab}; checkpoint {total:.0f} MB bf16 in "
            f"{len(list(ckpt.glob('*.safetensors')))} files"
        )
        print(
            "| load dtype | path | TP | peak private MB (per rank) | / whole model "
            "| peak RSS MB (file pages too) | params held MB (per rank) | seconds |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for dtype in args.dtypes.split(","):
            whole = total * torch.empty(0, dtype=resolve_dtype(dtype)).element_size() / 2
            for size in map(int, args.sizes.split(",")):
                for mode in ("one",) if size == 1 else ("old", "shard-only"):
                    out = Path(tmp, f"{dtype}-{mode}-{size}")
                    out.mkdir()
                    launch(measure, size, mode, str(ckpt), dtype, str(out))
                    rows = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(size)]
                    private = max(r["private"] for r in rows)
                    print(
                        f"| {dtype} | {mode} | {size} | {private:.0f} | {private / whole:.2f} "
                        f"| {max(r['peak'] for r in rows):.0f} "
                        f"| {max(r['params'] for r in rows):.0f} "
                        f"| {max(r['seconds'] for r in rows):.2f} |"
                    )


if __name__ == "__main__":
    main()

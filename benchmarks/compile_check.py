"""Compile the confidence and grouped-MoE Triton kernels for an H100/H200 (sm_90) on a machine
without a GPU, and count their global loads in the PTX.

    env -u TRITON_INTERPRET python benchmarks/compile_check.py

Why: the interpreter (tests) checks what the kernels compute, not that they compile, and a
compile error found on a lent GPU costs the lease. The load counts show whether the weight and
logit loads are vectorised (16-byte `ld.global.v4` or `cp.async`) or fall back to one element
per load (`ld.global.b16`), as the grouped kernel's weight loads do without the ALIGNED hint.
Arguments get the divisibility-by-16 attribute a real launch gives pointers and sizes.
"""

from __future__ import annotations

import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dinfer_kernels import triton_moe as tm
from dinfer_kernels import triton_ops as tk

TARGET = GPUTarget("cuda", 90, 32)
LOADS = {"v4": r"ld\.global(\.\S+)?\.v4", "async": r"cp\.async\.\S+", "b16": r"ld\.global\.b16"}


def compile_one(fn, signature: dict, constexprs: dict, divisible: list[str]) -> str:
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    ptx = triton.compile(src, target=TARGET).asm["ptx"]
    return ", ".join(f"{k} {len(re.findall(p, ptx))}" for k, p in LOADS.items())


def main() -> None:
    conf = {
        "logits_ptr": "*bf16",
        "temp_ptr": "*fp32",
        "seed_ptr": "*i64",
        "current_ptr": "*i64",
        "token_ptr": "*i64",
        "prob_ptr": "*fp32",
        "second_ptr": "*i64",
        "second_prob_ptr": "*fp32",
        "current_prob_ptr": "*fp32",
        "part_ptr": "*fp32",
        "part_token_ptr": "*i64",
        "vocab": "i32",
        "split_size": "i32",
        "positions": "i32",
        "n_parts": "i32",
    }
    for sample in (False, True):
        for extra in (False, True):
            for final in (True, False):
                c = dict(CHUNK=2048, SAMPLE=sample, EXTRA=extra, FINAL=final, COMPUTE=tl.float32)
                loads = compile_one(
                    tk._confidence_kernel, dict(conf), c, ["logits_ptr", "vocab", "split_size"]
                )
                print(f"confidence sample={sample} extra={extra} final={final}: {loads}")
        merge = {k: conf[k] for k in ("part_ptr", "part_token_ptr", "token_ptr", "prob_ptr")}
        merge.update(second_ptr="*i64", second_prob_ptr="*fp32", current_prob_ptr="*fp32")
        merge.update(n_parts="i32", vocab="i32")
        loads = compile_one(tk._confidence_merge_kernel, merge, dict(PARTS=32, EXTRA=sample), [])
        print(f"merge extra={sample}: {loads}")
    for dtype, precision in (("*bf16", None), ("*fp32", "ieee")):
        for aligned in (True, False):
            common = dict(
                ALIGNED=aligned, PRECISION=precision, ACC=tl.float32, BLOCK_M=16, BLOCK_N=64,
                BLOCK_K=64,
            )  # fmt: skip
            for fn, first, out in (
                (tm._experts_up_kernel, "h_ptr", "act_ptr"),
                (tm._experts_down_kernel, "act_ptr", "out_ptr"),
            ):
                sig = {first: dtype, "w_ptr": dtype, "table_ptr": "*i64", "order_ptr": "*i64"}
                sig.update(tile_expert_ptr="*i64", tile_start_ptr="*i64", tile_end_ptr="*i64")
                sig.update({out: dtype, "d": "i32", "H": "i32", "top_k": "i32"})
                divisible = [a for a, t in sig.items() if t.startswith("*")] + ["d", "H"]
                loads = compile_one(fn, sig, dict(common), divisible)
                print(f"{fn.__name__} {dtype[1:]} aligned={aligned}: {loads}")


if __name__ == "__main__":
    main()

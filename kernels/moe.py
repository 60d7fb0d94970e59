"""Routed experts of a mixture-of-experts layer without host-side counts.

Why: the loop in kernels.reference.routed_experts needs each expert's token count on the host
(`.tolist()`), a sync every layer on a GPU that also rules out CUDA-graph capture. Here are the
pieces of the two paths that need none:

- `ExpertWeights`: the experts' weights where they already are (one tensor per expert and
  projection, as a checkpoint loads them; no stacked copy), with a device table of their offsets
  for the Triton grouped GEMM (kernels/triton_moe.py).
- `expert_tiles`: the (token, choice) pairs sorted by expert and cut into tiles of one expert
  each, with device-side offsets only; the grid is the static worst case.
- `dense_experts`: a torch path for CPUs and GPUs without Triton. Every expert runs on every
  token and each pair takes its expert's row (torch.where, no indexing by counts). Trade-off: E/k
  times the loop's multiply-adds (64/8 = 8x for LLaDA-MoE), no host reads and no scatter, and
  memory bounded like the loop's (one expert's activations at a time plus the [N, k, d] pair
  outputs). The dispatcher (kernels.routed_experts) takes it only where that extra work is small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinfer_kernels import reference


class ExpertWeights:
    """E experts' SwiGLU weights in nn.Linear layout: gate[e], up[e] [H, d] and down[e] [d, H],
    all contiguous, of one dtype and device. The tensors are referenced, never copied."""

    def __init__(
        self, gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor]
    ) -> None:
        if not gate or not (len(gate) == len(up) == len(down)):
            raise ValueError("experts: gate, up and down need one weight per expert, at least one")
        hidden, d_model = gate[0].shape
        first = gate[0]
        for name, tensors, shape in (
            ("gate", gate, (hidden, d_model)),
            ("up", up, (hidden, d_model)),
            ("down", down, (d_model, hidden)),
        ):
            for e, w in enumerate(tensors):
                if tuple(w.shape) != shape or w.dtype != first.dtype or w.device != first.device:
                    raise ValueError(
                        f"experts: {name}[{e}] is {tuple(w.shape)} {w.dtype} on {w.device}; every "
                        f"expert needs {shape} {first.dtype} on {first.device}"
                    )
        self.gate, self.up, self.down = gate, up, down
        self.num_experts, self.hidden, self.d_model = len(gate), hidden, d_model
        self.dtype, self.device = first.dtype, first.device
        self._offsets: torch.Tensor | None = None
        self.aligned = False

    def offsets(self) -> torch.Tensor | None:
        """[E, 3] int64 on the weights' device: element offsets of gate[e], up[e], down[e] from
        gate[0], or None when some weight is not contiguous or not a whole number of elements
        away. Built once (one host-to-device copy: call it before capturing a CUDA graph).
        `aligned`: every offset a multiple of 16 elements (the kernel may then say so)."""
        if self._offsets is None:
            size = self.gate[0].element_size()
            base = self.gate[0].data_ptr()
            table = []
            for g, u, d in zip(self.gate, self.up, self.down):
                for w in (g, u, d):
                    if not w.is_contiguous() or (w.data_ptr() - base) % size:
                        return None
                table.append([(w.data_ptr() - base) // size for w in (g, u, d)])
            self.aligned = all(o % 16 == 0 for row in table for o in row)
            self._offsets = torch.tensor(table, dtype=torch.int64, device=self.device)
        return self._offsets


def expert_tiles(ids: torch.Tensor, num_experts: int, block_m: int):
    """ids [N, k] expert per (token, choice) -> (order [P], tile_expert [T], tile_start [T],
    tile_end [T]), P = N * k, all on ids' device with no host read.

    `order` lists the pairs (flat slot = token * k + choice) sorted by expert, stable. Tile t
    covers sorted positions [tile_start, min(tile_start + block_m, tile_end)) of one expert
    tile_expert[t] (-1: an unused tile). T = ceil(P / block_m) + min(E, P) bounds the tiles any
    routing needs (each expert adds at most one partial tile), so the grid never depends on data."""
    flat = ids.reshape(-1)
    P = flat.numel()
    order = torch.argsort(flat, stable=True)
    experts = torch.arange(num_experts + 1, device=ids.device, dtype=flat.dtype)
    offsets = torch.searchsorted(flat[order], experts)  # [E + 1]: first sorted pair of expert e
    tiles = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)  # tiles of experts 0..e
    T = -(-P // block_m) + min(num_experts, P)
    t = torch.arange(T, device=ids.device, dtype=flat.dtype)
    owner = torch.searchsorted(ends, t, right=True)  # E past the last used tile
    e = owner.clamp(max=num_experts - 1)
    tile_start = offsets[e] + (t - (ends[e] - tiles[e])) * block_m
    tile_expert = torch.where(owner < num_experts, e, -1)
    return order, tile_expert, tile_start, offsets[e + 1]


def combine(slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-pair expert outputs [N, k, d] -> sum_j weights[:, j] * slots[:, j] in weights' dtype,
    in choice order (no scatter-add: the same sum as kernels.reference.routed_experts)."""
    return (slots.to(weights.dtype) * weights[..., None]).sum(dim=1)


def dense_experts(
    h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """kernels.reference.routed_experts without host reads: every expert on every token, each
    (token, choice) keeping its own expert's output. h [N, d], ids and weights [N, k] -> [N, d]."""
    N, k = ids.shape
    slots = torch.zeros(N, k, h.shape[-1], dtype=h.dtype, device=h.device)
    for e in range(experts.num_experts):
        gate, up, down = experts.gate[e], experts.up[e], experts.down[e]
        y = F.linear(reference.swiglu(F.linear(h, gate), F.linear(h, up)), down)
        slots = torch.where((ids == e)[..., None], y[:, None, :], slots)
    return combine(slots, weights)

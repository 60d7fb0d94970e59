"""Sharding a loaded model over a tensor-parallel group, and the model the engine then calls.

Every rank loads the full model, then keeps its slice (`shard_model`):
- attention: the query heads split in equal parts; the key/value heads split the same way, or,
  when there are fewer of them than ranks, each rank keeps the one its query heads read
  (replicated); the output projection is row-parallel. The KV cache follows: it holds the
  rank's key/value heads only (`LocalConfig.n_kv_heads`).
- dense MLPs (LLaDA's, Dream's, the MoE families' dense layers and shared experts): gate and up
  column-parallel, down row-parallel. Routers stay whole on every rank; routed experts too,
  unless expert_parallel splits them: with the "all_reduce" dispatch each MoE block's outputs
  are summed in one all-reduce; with "all_to_all" each rank routes its slice of the tokens, the
  pairs travel to their experts' owners and back, and an all-gather restores all the tokens.
- the embedding and the LM head: vocabulary-parallel; the logits stay sharded.
Norms, RoPE and routers are replicated: after each all-reduce every rank holds the same hidden
states, so they compute the same thing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.layers import DiffusionLM, RoutedExperts
from workers.parallel.group import TensorParallel, set_current
from workers.parallel.layers import (
    AbsentExpert,
    DispatchedExperts,
    ExpertParallel,
    ExpertParallelAllToAll,
    LocalExperts,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_linear,
    split,
)

ATTENTION = (("q_proj", "k_proj", "v_proj", "attn_out"), ("q_proj", "k_proj", "v_proj", "o_proj"))
FUSED_ATTENTION = ("query_key_value", "dense")  # LLaDA2: one projection, rows q | k | v
MLP = (("gate_proj", "up_proj", "down_proj"), ("ff_proj", "up_proj", "ff_out"))
# how expert parallel moves tokens; the first is the default (faster at small batch on CPU and
# not yet measured on GPUs: benchmarks/ep_dispatch.py, benchmarks/RESULTS.md)
EP_DISPATCHES = ("all_reduce", "all_to_all")


class LocalConfig:
    """The model's config as this rank's KV cache sees it: its own key/value heads; every other
    field is the full model's."""

    def __init__(self, full: Any, n_kv_heads: int):
        self.full = full
        self._n_kv_heads = n_kv_heads

    def __getattr__(self, name: str) -> Any:
        return getattr(self.full, name)

    @property
    def n_kv_heads(self) -> int:
        return self._n_kv_heads

    @property
    def mask_token_id(self) -> int:
        return int(self.full.mask_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.full.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return int(self.full.vocab_size)

    @property
    def max_sequence_length(self) -> int:
        return int(self.full.max_sequence_length)

    @property
    def n_layers(self) -> int:
        return int(self.full.n_layers)

    @property
    def head_dim(self) -> int:
        return int(self.full.head_dim)


def head_split(n_heads: int, n_kv_heads: int, tp: TensorParallel) -> tuple[list[int], list[int]]:
    """(query heads, key/value heads) of this rank."""
    T, r = tp.size, tp.rank
    if n_heads % T:
        raise ValueError(
            f"tensor_parallel_size={T} does not divide the model's {n_heads} attention heads: "
            "choose a size that does"
        )
    h = n_heads // T
    queries = list(range(r * h, (r + 1) * h))
    if n_kv_heads % T == 0:
        k = n_kv_heads // T
        return queries, list(range(r * k, (r + 1) * k))
    if T % n_kv_heads == 0:  # fewer key/value heads than ranks: each rank keeps its group's
        return queries, [r // (T // n_kv_heads)]
    raise ValueError(
        f"tensor_parallel_size={T} and the model's {n_kv_heads} key/value heads: one must divide "
        "the other; choose another size"
    )


def _rows(heads: list[int], head_dim: int, offset: int = 0) -> torch.Tensor:
    return torch.cat(
        [torch.arange(offset + i * head_dim, offset + (i + 1) * head_dim) for i in heads]
    )


def _shard_attention(module: nn.Module, tp: TensorParallel) -> int:
    """Keep this rank's heads of an attention module (attributes n_heads, n_kv_heads, head_dim);
    returns its number of key/value heads."""
    H, Hkv, hd = (int(getattr(module, a)) for a in ("n_heads", "n_kv_heads", "head_dim"))
    queries, kv = head_split(H, Hkv, tp)
    q_rows, kv_rows = _rows(queries, hd), _rows(kv, hd)
    if hasattr(module, FUSED_ATTENTION[0]):
        fused, out = FUSED_ATTENTION
        rows = torch.cat([q_rows, H * hd + kv_rows, (H + Hkv) * hd + kv_rows])
        setattr(module, fused, column_linear(getattr(module, fused), rows))
    else:
        names = next((n for n in ATTENTION if all(hasattr(module, a) for a in n)), None)
        if names is None:
            raise NotImplementedError(f"tensor parallel: unknown attention {type(module).__name__}")
        q, k, v, out = names
        setattr(module, q, column_linear(getattr(module, q), q_rows))
        setattr(module, k, column_linear(getattr(module, k), kv_rows))
        setattr(module, v, column_linear(getattr(module, v), kv_rows))
    setattr(module, out, RowParallelLinear(getattr(module, out), q_rows, tp))
    setattr(module, "n_heads", len(queries))  # noqa: B010 (not an nn.Module attribute)
    setattr(module, "n_kv_heads", len(kv))  # noqa: B010
    return len(kv)


def _shard_mlp(
    module: nn.Module, names: tuple[str, str, str], tp: TensorParallel, reduce: bool = True
) -> None:
    gate, up, down = names
    lo, hi = split(getattr(module, gate).out_features, tp.size, tp.rank)
    cols = torch.arange(lo, hi)
    setattr(module, gate, column_linear(getattr(module, gate), cols))
    setattr(module, up, column_linear(getattr(module, up), cols))
    setattr(module, down, RowParallelLinear(getattr(module, down), cols, tp, reduce))


def _mlp_names(module: nn.Module) -> tuple[str, str, str] | None:
    return next(
        (n for n in MLP if all(isinstance(getattr(module, a, None), nn.Linear) for a in n)), None
    )


def shard_moe(moe: nn.Module, tp: TensorParallel, dispatch: str = EP_DISPATCHES[0]) -> nn.Module:
    """Expert parallel for one MoE block (a module with a RoutedExperts `experts` and maybe
    `shared_experts`): keep this rank's contiguous share of the routed experts (the others become
    AbsentExpert) and return the block wrapped for `dispatch`. "all_reduce": the shared expert
    is sharded without its own reduce (ExpertParallel's one all-reduce sums it too);
    "all_to_all": the shared expert stays whole, as it runs on this rank's tokens only.
    (LLaDA-MoE's shared expert hangs off the layer, outside the block: a tensor-parallel MLP
    under both dispatches.)"""
    if dispatch not in EP_DISPATCHES:
        raise ValueError(f"expert_parallel={dispatch!r}: use one of {EP_DISPATCHES} (or True)")
    experts = moe.experts
    if not isinstance(experts, RoutedExperts):
        raise NotImplementedError(f"expert parallel: unknown experts {type(experts).__name__}")
    lo, hi = split(len(experts), tp.size, tp.rank)
    for e in range(len(experts)):
        if not lo <= e < hi:
            experts[e] = AbsentExpert()
    if dispatch == "all_to_all":
        moe.experts = DispatchedExperts(experts, tp)
        return ExpertParallelAllToAll(moe, tp)
    moe.experts = LocalExperts(experts, tp)
    shared = getattr(moe, "shared_experts", None)
    names = None if shared is None else _mlp_names(shared)
    if shared is not None and names is not None:
        _shard_mlp(shared, names, tp, reduce=False)
    return ExpertParallel(moe, tp)


def _shard_experts(inner: nn.Module, tp: TensorParallel, dispatch: str) -> set[int]:
    """shard_moe on every MoE block of `inner`; returns the ids of the shared experts it handled
    (sharded or deliberately kept whole), which the dense-MLP pass must leave alone."""
    done: set[int] = set()
    for name, moe in list(inner.named_modules()):
        if not isinstance(getattr(moe, "experts", None), nn.ModuleList):
            continue
        shared = getattr(moe, "shared_experts", None)
        if shared is not None:
            done.add(id(shared))
        parent_name, _, attr = name.rpartition(".")
        setattr(inner.get_submodule(parent_name), attr, shard_moe(moe, tp, dispatch))
    return done


def _is_expert(name: str) -> bool:
    """A routed expert (a member of an `experts` list): kept whole on every rank."""
    return "experts" in name.split(".")[:-1]


def _drop(model: nn.Module, tensor: torch.Tensor) -> None:
    """Free a parameter the sharded model no longer reads (the full embedding and LM head)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is tensor:
                empty = torch.empty(0, dtype=p.dtype, device=p.device)
                module._parameters[name] = nn.Parameter(empty, requires_grad=False)


class TensorParallelModel(nn.Module):
    """This rank's shard of a DiffusionLM, following workers.interfaces.DiffusionModel; its
    logits are [B, L, vocab_stop - vocab_start], the columns of the rank's vocabulary shard."""

    def __init__(self, inner: DiffusionLM, tp: TensorParallel, expert_parallel: bool | str = False):
        super().__init__()
        cfg = inner.config
        V = cfg.vocab_size
        if tp.size > V:
            raise ValueError(f"tensor_parallel_size={tp.size} exceeds the vocabulary ({V} ids)")
        lo, hi = split(V, tp.size, tp.rank)
        self.tp = dataclasses.replace(tp, vocab_start=lo, vocab_stop=hi)
        table, head = inner.embed_weight, inner.lm_head_weight
        # ids beyond the vocabulary (an embedding padded past vocab_size) live on the last rank
        stop = table.shape[0] if tp.rank == tp.size - 1 else hi
        self.embedding = VocabParallelEmbedding(table, lo, stop, self.tp)
        self.head = nn.Parameter(head[lo:hi].detach().clone(), requires_grad=False)
        _drop(inner, table)
        _drop(inner, head)
        kv_heads = {
            _shard_attention(m, self.tp)
            for m in list(inner.modules())
            if all(hasattr(m, a) for a in ("n_heads", "n_kv_heads", "head_dim"))
        }
        dispatch = ep_dispatch(expert_parallel)
        done = set() if dispatch is None else _shard_experts(inner, self.tp, dispatch)
        for name, m in list(inner.named_modules()):
            names = _mlp_names(m)
            if names is not None and not _is_expert(name) and id(m) not in done:
                _shard_mlp(m, names, self.tp)
        if len(kv_heads) != 1:
            raise NotImplementedError(f"tensor parallel: layers with {kv_heads} key/value heads")
        self.inner = inner
        self.config = LocalConfig(cfg, kv_heads.pop())
        self.logit_shift = inner.logit_shift
        self.block_causal = inner.block_causal

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.head

    @property
    def embed_weight(self) -> torch.Tensor:
        """This rank's rows of the embedding table (rows vocab_start onwards)."""
        return self.embedding.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)

    def forward(
        self, input_ids, positions, key_mask=None, cache=None, start: int = 0, inputs_embeds=None
    ) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h = self.inner.hidden(input_ids, positions, key_mask, cache, start, inputs_embeds=x)
        return F.linear(h, self.head)


def ep_dispatch(expert_parallel: bool | str | None) -> str | None:
    """The dispatch an `expert_parallel` argument asks for: None (off: False or None), the
    default for True, or the name itself ("all_reduce", "all_to_all")."""
    if expert_parallel is None or expert_parallel is False:
        return None
    if expert_parallel is True:
        return EP_DISPATCHES[0]
    if expert_parallel not in EP_DISPATCHES:
        raise ValueError(
            f"expert_parallel={expert_parallel!r}: use True, False or one of {EP_DISPATCHES}"
        )
    return str(expert_parallel)


def shard_model(
    model: DiffusionLM, tp: TensorParallel, expert_parallel: bool | str = False
) -> TensorParallelModel:
    """This rank's shard of `model` (which it modifies: use the result, not `model`), and the
    process-wide handle set so the sampler merges the vocabulary shards. expert_parallel: split
    the routed experts over the ranks too (else every rank keeps them all): True or
    "all_reduce" (every rank computes its experts for all tokens, one all-reduce), or
    "all_to_all" (tokens dispatched to their experts' ranks and back)."""
    sharded = TensorParallelModel(model, tp, expert_parallel)
    set_current(sharded.tp)
    return sharded

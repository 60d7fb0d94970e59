"""Sharding a model over a tensor-parallel group, and the model the engine then calls.

What each rank keeps:
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

One set of rules, two ways to get the tensors: each rule names the part of a checkpoint tensor
the rank keeps (a `Keep`) and asks a `Source` for it by checkpoint name. `shard_model` on a
loaded model slices its tensors in memory; workers.loader builds the model on `meta` and reads
from the safetensors files only the bytes each Keep names, so a rank never holds the full
weights. Both run the same code below, so the two can never disagree on a slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinfer_async.validation import EP_DISPATCHES
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
    linear_of,
    split,
)

ATTENTION = (("q_proj", "k_proj", "v_proj", "attn_out"), ("q_proj", "k_proj", "v_proj", "o_proj"))
FUSED_ATTENTION = ("query_key_value", "dense")  # LLaDA2: one projection, rows q | k | v
MLP = (("gate_proj", "up_proj", "down_proj"), ("ff_proj", "up_proj", "ff_out"))
# how expert parallel moves tokens; the first is the default (faster at small batch on CPU and
# not yet measured on GPUs: benchmarks/ep_dispatch.py, benchmarks/RESULTS.md)

Ranges = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Keep:
    """The part of one checkpoint tensor a rank holds: along `dim`, the index ranges [lo, hi)
    joined in order; ranges=None: the whole tensor. Why a value rather than a slicing step: the
    same rule slices a tensor in memory (`take`) and tells the loader which bytes to read."""

    dim: int = 0
    ranges: Ranges | None = None

    def shape(self, full: Sequence[int]) -> tuple[int, ...]:
        """The kept part's shape, for a tensor of shape `full`."""
        out = list(full)
        if self.ranges is not None:
            out[self.dim] = sum(hi - lo for lo, hi in self.ranges)
        return tuple(out)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The kept part of `full`: `full` itself when whole, else a new tensor."""
        if self.ranges is None:
            return full
        return torch.cat([full.narrow(self.dim, lo, hi - lo) for lo, hi in self.ranges], self.dim)


WHOLE = Keep()
# tensor by checkpoint name and the part kept -> that part (on the target device and dtype)
Source = Callable[[str, Keep], torch.Tensor]


def memory_source(model: nn.Module) -> Source:
    """The parts of `model`'s own (loaded) parameters."""
    params = dict(model.named_parameters())

    def read(name: str, keep: Keep) -> torch.Tensor:
        return keep.take(params[name].detach() if keep.ranges is not None else params[name])

    return read


class Shards:
    """This rank's parts of the parameters of `root` (a full model or block, maybe on `meta`),
    read through `source` by checkpoint name (root's parameter names); default: sliced from
    root's own tensors."""

    def __init__(self, root: nn.Module, tp: TensorParallel, source: Source | None = None):
        self.tp = tp
        self.params = dict(root.named_parameters())  # also keeps the originals' ids unique
        self.names = {id(p): n for n, p in self.params.items()}
        self.source = source or memory_source(root)

    def read(self, tensor: torch.Tensor, keep: Keep = WHOLE) -> torch.Tensor:
        return self.source(self.names[id(tensor)], keep)

    def column(self, linear: nn.Linear, rows: Ranges) -> nn.Linear:
        """Column-parallel: the output features `rows` of `linear` (weight and bias rows)."""
        keep = Keep(0, rows)
        bias = None if linear.bias is None else self.read(linear.bias, keep)
        return linear_of(self.read(linear.weight, keep), bias)

    def row(self, linear: nn.Linear, columns: Ranges, reduce: bool = True) -> RowParallelLinear:
        """Row-parallel: the input features `columns` of `linear`, its bias whole."""
        bias = None if linear.bias is None else self.read(linear.bias)
        return RowParallelLinear(self.read(linear.weight, Keep(1, columns)), bias, self.tp, reduce)

    def fill(self, module: nn.Module) -> None:
        """Every parameter of `module` that is still one of root's (replicated: norms, routers,
        the routed experts this rank runs) gets its whole tensor from the source."""
        done: dict[int, nn.Parameter] = {}
        for m in module.modules():
            for leaf, p in list(m._parameters.items()):
                if p is None or id(p) not in self.names:
                    continue
                if id(p) not in done:
                    value = self.read(p)
                    done[id(p)] = (
                        p if value is p else nn.Parameter(value.detach(), requires_grad=False)
                    )
                m._parameters[leaf] = done[id(p)]


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


def _rows(heads: list[int], head_dim: int, offset: int = 0) -> Ranges:
    """The weight rows of `heads` (consecutive ids), from row `offset`: one range."""
    return ((offset + heads[0] * head_dim, offset + (heads[-1] + 1) * head_dim),)


def _shard_attention(module: nn.Module, shards: Shards) -> int:
    """Keep this rank's heads of an attention module (attributes n_heads, n_kv_heads, head_dim);
    returns its number of key/value heads."""
    H, Hkv, hd = (int(getattr(module, a)) for a in ("n_heads", "n_kv_heads", "head_dim"))
    queries, kv = head_split(H, Hkv, shards.tp)
    q_rows, kv_rows = _rows(queries, hd), _rows(kv, hd)
    if hasattr(module, FUSED_ATTENTION[0]):
        fused, out = FUSED_ATTENTION
        rows = q_rows + _rows(kv, hd, H * hd) + _rows(kv, hd, (H + Hkv) * hd)
        setattr(module, fused, shards.column(getattr(module, fused), rows))
    else:
        names = next((n for n in ATTENTION if all(hasattr(module, a) for a in n)), None)
        if names is None:
            raise NotImplementedError(f"tensor parallel: unknown attention {type(module).__name__}")
        q, k, v, out = names
        setattr(module, q, shards.column(getattr(module, q), q_rows))
        setattr(module, k, shards.column(getattr(module, k), kv_rows))
        setattr(module, v, shards.column(getattr(module, v), kv_rows))
    setattr(module, out, shards.row(getattr(module, out), q_rows))
    setattr(module, "n_heads", len(queries))  # noqa: B010 (not an nn.Module attribute)
    setattr(module, "n_kv_heads", len(kv))  # noqa: B010
    return len(kv)


def _shard_mlp(
    module: nn.Module, names: tuple[str, str, str], shards: Shards, reduce: bool = True
) -> None:
    gate, up, down = names
    cols = (split(getattr(module, gate).out_features, shards.tp.size, shards.tp.rank),)
    setattr(module, gate, shards.column(getattr(module, gate), cols))
    setattr(module, up, shards.column(getattr(module, up), cols))
    setattr(module, down, shards.row(getattr(module, down), cols, reduce))


def _mlp_names(module: nn.Module) -> tuple[str, str, str] | None:
    return next(
        (n for n in MLP if all(isinstance(getattr(module, a, None), nn.Linear) for a in n)), None
    )


def shard_moe(
    moe: nn.Module,
    tp: TensorParallel,
    dispatch: str = EP_DISPATCHES[0],
    shards: Shards | None = None,
) -> nn.Module:
    """Expert parallel for one MoE block (a module with a RoutedExperts `experts` and maybe
    `shared_experts`): keep this rank's contiguous share of the routed experts (the others become
    AbsentExpert, never read) and return the block wrapped for `dispatch`. "all_reduce": the
    shared expert is sharded without its own reduce (ExpertParallel's one all-reduce sums it
    too); "all_to_all": the shared expert stays whole, as it runs on this rank's tokens only.
    (LLaDA-MoE's shared expert hangs off the layer, outside the block: a tensor-parallel MLP
    under both dispatches.) `shards`: where the tensors come from (default: the block's own);
    the block's replicated tensors are filled by the caller of a given `shards`, else here."""
    if dispatch not in EP_DISPATCHES:
        raise ValueError(f"expert_parallel={dispatch!r}: use one of {EP_DISPATCHES} (or True)")
    experts = moe.experts
    if not isinstance(experts, RoutedExperts):
        raise NotImplementedError(f"expert parallel: unknown experts {type(experts).__name__}")
    own = shards is None
    shards = Shards(moe, tp) if shards is None else shards
    lo, hi = split(len(experts), tp.size, tp.rank)
    for e in range(len(experts)):
        if not lo <= e < hi:
            experts[e] = AbsentExpert()
    wrapped: nn.Module
    if dispatch == "all_to_all":
        moe.experts = DispatchedExperts(experts, tp)
        wrapped = ExpertParallelAllToAll(moe, tp)
    else:
        moe.experts = LocalExperts(experts, tp)
        shared = getattr(moe, "shared_experts", None)
        names = None if shared is None else _mlp_names(shared)
        if shared is not None and names is not None:
            _shard_mlp(shared, names, shards, reduce=False)
        wrapped = ExpertParallel(moe, tp)
    if own:
        shards.fill(wrapped)
    return wrapped


def _shard_experts(inner: nn.Module, shards: Shards, dispatch: str) -> set[int]:
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
        wrapped = shard_moe(moe, shards.tp, dispatch, shards)
        setattr(inner.get_submodule(parent_name), attr, wrapped)
    return done


def _is_expert(name: str) -> bool:
    """A routed expert (a member of an `experts` list): kept whole on every rank."""
    return "experts" in name.split(".")[:-1]


def _drop(model: nn.Module, tensor: torch.Tensor, like: torch.Tensor) -> None:
    """Free a parameter the sharded model no longer reads (the full embedding and LM head),
    never reading it: an empty one on `like`'s device and dtype takes its place."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is tensor:
                empty = torch.empty(0, dtype=like.dtype, device=like.device)
                module._parameters[name] = nn.Parameter(empty, requires_grad=False)


class TensorParallelModel(nn.Module):
    """This rank's shard of a DiffusionLM, following workers.interfaces.DiffusionModel; its
    logits are [B, L, vocab_stop - vocab_start], the columns of the rank's vocabulary shard.

    `inner` is modified in place; its tensors come from `source` by checkpoint name (default:
    its own, sliced in memory; workers.loader passes one that reads the safetensors files, with
    `inner` built on `meta`)."""

    def __init__(
        self,
        inner: DiffusionLM,
        tp: TensorParallel,
        expert_parallel: bool | str = False,
        source: Source | None = None,
    ):
        super().__init__()
        cfg = inner.config
        V = cfg.vocab_size
        if tp.size > V:
            raise ValueError(f"tensor_parallel_size={tp.size} exceeds the vocabulary ({V} ids)")
        dispatch = ep_dispatch(expert_parallel)
        lo, hi = split(V, tp.size, tp.rank)
        self.tp = dataclasses.replace(tp, vocab_start=lo, vocab_stop=hi)
        self.expert_parallel = dispatch
        shards = Shards(inner, self.tp, source)
        table, head = inner.embed_weight, inner.lm_head_weight
        # ids beyond the vocabulary (an embedding padded past vocab_size) live on the last rank
        stop = table.shape[0] if tp.rank == tp.size - 1 else hi
        rows = shards.read(table, Keep(0, ((lo, stop),)))
        self.embedding = VocabParallelEmbedding(rows, lo, stop, self.tp)
        self.head = nn.Parameter(shards.read(head, Keep(0, ((lo, hi),))), requires_grad=False)
        _drop(inner, table, self.head)
        _drop(inner, head, self.head)
        kv_heads = {
            _shard_attention(m, shards)
            for m in list(inner.modules())
            if all(hasattr(m, a) for a in ("n_heads", "n_kv_heads", "head_dim"))
        }
        done = set() if dispatch is None else _shard_experts(inner, shards, dispatch)
        for name, m in list(inner.named_modules()):
            names = _mlp_names(m)
            if names is not None and not _is_expert(name) and id(m) not in done:
                _shard_mlp(m, names, shards)
        if len(kv_heads) != 1:
            raise NotImplementedError(f"tensor parallel: layers with {kv_heads} key/value heads")
        shards.fill(inner)  # what stays whole: norms, routers, the experts this rank runs
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
        self,
        input_ids,
        positions,
        key_mask=None,
        cache=None,
        start: int = 0,
        inputs_embeds=None,
        logit_columns: slice | None = None,
    ) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h = self.inner.hidden(input_ids, positions, key_mask, cache, start, x, logit_columns)
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
    model: DiffusionLM | TensorParallelModel,
    tp: TensorParallel,
    expert_parallel: bool | str = False,
    source: Source | None = None,
) -> TensorParallelModel:
    """This rank's shard of `model` (which it modifies: use the result, not `model`), and the
    process-wide handle set so the sampler merges the vocabulary shards. expert_parallel: split
    the routed experts over the ranks too (else every rank keeps them all): True or
    "all_reduce" (every rank computes its experts for all tokens, one all-reduce), or
    "all_to_all" (tokens dispatched to their experts' ranks and back). `source`: where the
    tensors come from (see TensorParallelModel). A model already sharded the same way (the
    loader's, workers.loader.load_model with tensor_parallel) is returned as it is."""
    if isinstance(model, TensorParallelModel):
        if model.tp.size != tp.size or model.tp.rank != tp.rank:
            raise ValueError(
                f"the model is sharded for rank {model.tp.rank} of {model.tp.size}, "
                f"not rank {tp.rank} of tensor_parallel_size={tp.size}: load it again"
            )
        if model.expert_parallel != ep_dispatch(expert_parallel):
            raise ValueError(
                f"the model is sharded with expert_parallel={model.expert_parallel!r}, "
                f"not {expert_parallel!r}: load it again with the same setting"
            )
        set_current(model.tp)
        return model
    sharded = TensorParallelModel(model, tp, expert_parallel, source)
    set_current(sharded.tp)
    return sharded

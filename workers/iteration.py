"""The iteration manager: one block of semi-autoregressive denoising over a batch of requests.

A `BlockRound` lays the running requests out so their current blocks share columns, then steps:
the cache policy picks what goes through the model, the decoders pick what to commit, each row
at its own step of its block. Rows done with their block leave at a host check; rows starting
a block join there (`join`: the layout widens to hold them). Rows may be at different blocks of
different windows, with different prompts and decoding parameters; only the block length and
cache policy are shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dinfer_async.params import SamplingParams
from workers.decoders import DecoderSet
from workers.graphs import COLUMNS
from workers.nosync import step_region
from workers.sampling import expected_embedding
from workers.shared import block_causal_mask, block_seed, forbid_tokens, step_seeds, until_eos

if TYPE_CHECKING:
    from workers.cache import CachePolicy
    from workers.graphs import StepGraphs
    from workers.interfaces import DiffusionModel
    from workers.kv_cache import KVCache, Overlay, RowWindow


@dataclass(eq=False)  # identity equality: a request is hashable and equal only to itself
class Sequence:
    """One request's state across rounds.

    `window` holds the positions decoded block by block. Usually it is exactly the gen_length
    answer positions. For block-causal models (LLaDA2) blocks sit at multiples of block_length
    from the first token, as the model was trained: the prompt's last partial block then opens
    the window already committed (`skip` tokens), and the window runs to the end of the block
    holding the last answer position; only [skip, skip + gen_length) is the answer.
    """

    id: Any  # the caller's handle (the worker's request id, denoise's index); never read here
    prompt: list[int]
    params: SamplingParams  # validated
    seed: int
    window: list[int]  # ids decoded block by block; mask until committed
    skip: int = 0  # window positions before the answer (a block-causal prompt's tail)
    block: int = 0  # the block the next round decodes
    forwards: int = 0
    committed: int = 0
    edits: int = 0  # committed positions an editing decoder ("joint") changed
    finish_reason: str | None = None
    admitted_at: float = 0.0
    seconds: float = 0.0
    aborted: bool = False
    stop_text: str | None = None  # finished by a stop string: the answer's text, cut before it

    @classmethod
    def create(
        cls,
        id: Any,
        prompt: list[int],
        params: SamplingParams,
        seed: int,
        mask_id: int,
        block_aligned: bool = False,
    ) -> Sequence:
        K = params.block_length
        tail = len(prompt) % K if block_aligned else 0  # the prompt's last partial block
        head = list(prompt[: len(prompt) - tail])
        length = -(-(tail + params.gen_length) // K) * K
        window = list(prompt[len(prompt) - tail :]) + [mask_id] * (length - tail)
        return cls(id, head, params, seed, window, skip=tail)

    @property
    def num_blocks(self) -> int:
        return len(self.window) // self.params.block_length

    def span(self, block: int) -> tuple[int, int]:
        """The answer positions of `block`, as window indices [lo, hi)."""
        K = self.params.block_length
        return max(block * K, self.skip), min((block + 1) * K, self.skip + self.params.gen_length)

    def seen_after_block(self, block_causal: bool) -> list[int]:
        """The window positions after the current block that a round feeds: none for a
        block-causal model (a block never sees what follows it), else the rest of the window,
        or its first `suffix_window` positions."""
        if block_causal:
            return []
        after = self.window[(self.block + 1) * self.params.block_length :]
        window = self.params.suffix_window
        return after if window is None else after[:window]

    def generated(self) -> list[int]:
        return self.window[self.skip : self.skip + self.params.gen_length]

    def answer(self, eos_id: int) -> list[int]:
        """The answer positions up to (not including) the first EOS."""
        return until_eos(self.generated(), eos_id)

    def stats(self, eos_id: int) -> dict:
        tokens = len(self.answer(eos_id))
        return {
            # forwards: model calls that still had masked positions of this request
            "forwards": self.forwards,
            "tokens": tokens,  # answer tokens before the first EOS
            # committed: positions committed (EOS padding of decoded blocks included)
            "committed": self.committed,
            "prompt_tokens": len(self.prompt) + self.skip,  # the prompt's tokens
            "tokens_per_forward": tokens / max(self.forwards, 1),  # answer tokens per forward
            "committed_per_forward": self.committed / max(self.forwards, 1),  # EOS padding included
            "edits": self.edits,  # committed positions replaced by token edits (decoder="joint")
            "seconds": self.seconds,
            "tokens_per_second": tokens / max(self.seconds, 1e-9),
        }


class Guidance:
    """Classifier-free guidance, all of its row bookkeeping: each guided row (cfg_scale > 0) also
    runs as an extra row, its unconditional copy with the prompt masked. The model sees the B
    rows followed by the copies, in the order of `rows`; so does the KV cache (B + len(self)
    rows); `combine` folds the copies' logits back into their rows."""

    def __init__(self, scales: list[float], device: torch.device):
        self.host_rows = [i for i, c in enumerate(scales) if c > 0]
        self.rows = torch.tensor(self.host_rows, dtype=torch.long, device=device)
        self.scales = torch.tensor([c for c in scales if c > 0], device=device)[:, None, None]

    def __len__(self) -> int:
        return len(self.rows)

    def extend(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, ...] -> [B + G, ...]: the guided rows repeated as their copies' rows."""
        return torch.cat([rows, rows[self.rows]]) if len(self) else rows

    def extend_ids(self, ids: torch.Tensor, in_prompt: torch.Tensor, mask_id: int) -> torch.Tensor:
        """Input ids [B, n] -> [B + G, n]: the copies have their prompt positions masked."""
        if not len(self):
            return ids
        return torch.cat([ids, torch.where(in_prompt[self.rows], mask_id, ids[self.rows])])

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """[B + G, ...] -> [B, ...]: uncond + (scale + 1) * (cond - uncond) on the guided rows."""
        if not len(self):
            return logits
        n = logits.shape[0] - len(self)
        logits, uncond = logits[:n], logits[n:]
        logits[self.rows] = uncond + (self.scales + 1) * (logits[self.rows] - uncond)
        return logits

    def cache_rows(self, kept: torch.Tensor, batch_rows: int) -> torch.Tensor:
        """The KV-cache rows of batch rows `kept` (of `batch_rows`): those rows, then the rows of
        their copies."""
        copies = torch.nonzero(torch.isin(self.rows, kept))[:, 0]
        return torch.cat([kept, batch_rows + copies])


class Batch:
    """The round's token layout: row i = left padding, prompt and decided blocks, the current
    block at columns [C, C + K), the rest of the window, right padding. RoPE positions start at
    0 on each row's first real token and padding is hidden from attention, so every row computes
    what it would alone. align > 1: the block start and the length are padded up to multiples
    of it (graphed steps: rounds at nearby blocks share a layout, workers/graphs.py)."""

    def __init__(
        self,
        model: DiffusionModel,
        seqs: list[Sequence],
        mask_id: int,
        pad_id: int,
        align: int = 1,
    ):
        self.model = model
        self.mask_id = mask_id
        self.pad_id = pad_id
        self.align = align
        self.seqs = seqs
        self.shift: int = model.logit_shift  # logits of column c predict column c + shift
        self.block_length = K = seqs[0].params.block_length
        self.block_start, self.length = self.layout_with(seqs, empty=True)
        self.block_end = self.block_start + K
        self.row_start: list[int] = []  # each row's first real column
        self.row_end: list[int] = []  # each row's end of real columns
        self.prompt_end: list[int] = []  # each row's end of prompt columns
        self.ids = torch.empty(0, self.length, dtype=torch.long, device=self.device)
        self._add_rows(seqs)
        # per-step padding waste: token slots fed through the model, and how many were real
        self.fed = 0
        self.fed_real = 0
        self.chunk_slots = 0  # run_full's chunk size in token slots (0: one forward)
        self.soft: torch.Tensor | None = None  # [B, K, d] next inputs of the block (soft diffusion)
        self._row_options(seqs)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head_weight.device

    def _parts(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """A row's tokens before its current block and those it feeds after it."""
        left = seq.prompt + seq.window[: seq.block * self.block_length]
        return left, seq.seen_after_block(self.model.block_causal)

    def span(self, seq: Sequence) -> int:
        """The columns a row's real tokens take in a round."""
        left, right = self._parts(seq)
        return len(left) + self.block_length + len(right)

    def layout_with(self, seqs: list[Sequence], empty: bool = False) -> tuple[int, int]:
        """(block start, length) of this layout once rows `seqs` join it (`empty`: of a layout
        for them alone): the block start moves right as far as the longest left part needs."""
        parts = [self._parts(s) for s in seqs]
        align = self.align
        C = -(-max(len(left) for left, _ in parts) // align) * align
        if not empty:
            C = max(C, self.block_start)
        end = C + self.block_length + max(len(right) for _, right in parts)
        if not empty:  # the present rows, moved right
            end = max(end, self.length + C - self.block_start)
        return C, -(-end // align) * align

    def _add_rows(self, seqs: list[Sequence]) -> None:
        """Lay rows `seqs` out after the present ones (the layout must hold them): one upload
        for their ids, then the masks of every row from the host bounds."""
        C, K = self.block_start, self.block_length
        grid = [[self.pad_id] * self.length for _ in seqs]
        for row, s in zip(grid, seqs):
            left, right = self._parts(s)
            lo = C - len(left)
            row[lo : C + K + len(right)] = left + s.window[s.block * K : (s.block + 1) * K] + right
            self.row_start.append(lo)
            self.row_end.append(C + K + len(right))
            self.prompt_end.append(lo + len(s.prompt) + s.skip)
        ids = torch.tensor(grid, dtype=torch.long, device=self.device).reshape(-1, self.length)
        self.ids = torch.cat([self.ids, ids])
        self._masks()

    def _masks(self) -> None:
        """real, positions and in_prompt [B, length] from the rows' bounds: RoPE positions
        start at 0 on a row's first real token; padding is hidden from attention."""
        bounds = [self.row_start, self.row_end, self.prompt_end]
        lo, hi, prompt_end = torch.tensor(bounds, dtype=torch.long, device=self.device)[..., None]
        column = torch.arange(self.length, device=self.device)[None]
        self.real = (column >= lo) & (column < hi)
        self.positions = (column - lo).clamp(min=0)
        self.in_prompt = (column >= lo) & (column < prompt_end)

    def join(self, seqs: list[Sequence]) -> int:
        """Rows `seqs` follow the present ones, at their block's first step; the layout widens
        to hold them (layout_with): returned is how far the present rows' columns moved right
        (their cache columns must move with them)."""
        C, length = self.layout_with(seqs)
        moved = C - self.block_start
        self.ids = F.pad(self.ids, (moved, length - self.length - moved), value=self.pad_id)
        self.row_start = [c + moved for c in self.row_start]
        self.row_end = [c + moved for c in self.row_end]
        self.prompt_end = [c + moved for c in self.prompt_end]
        self.block_start, self.block_end, self.length = C, C + self.block_length, length
        self.seqs = self.seqs + seqs
        self._add_rows(seqs)
        if self.soft is not None:  # their first step feeds their ids
            K = self.block_length
            self.soft = torch.cat([self.soft, self.model.embed(self.ids[-len(seqs) :, C : C + K])])
        self._row_options(self.seqs)
        return moved

    def _row_options(self, seqs: list[Sequence]) -> None:
        device = self.ids.device
        self.guidance = Guidance([s.params.cfg_scale for s in seqs], device)
        self.soft_rows = torch.tensor([s.params.soft_diffusion for s in seqs], device=device)

    def keep(self, rows: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Only `rows` stay (mid-block, e.g. after an abort). Returns the KV-cache rows to keep."""
        cache_rows = self.guidance.cache_rows(rows, self.rows)
        self.seqs = seqs
        kept = rows.tolist()
        self.row_start = [self.row_start[i] for i in kept]
        self.row_end = [self.row_end[i] for i in kept]
        self.prompt_end = [self.prompt_end[i] for i in kept]
        self.ids = self.ids[rows]
        self.real = self.real[rows]
        self.positions = self.positions[rows]
        self.in_prompt = self.in_prompt[rows]
        if self.soft is not None:
            self.soft = self.soft[rows]
        self._row_options(seqs)
        return cache_rows

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @property
    def cache_rows(self) -> int:
        """Rows of the KV cache: the batch's, then the guided rows' unconditional copies."""
        return self.rows + len(self.guidance)

    def block(self) -> torch.Tensor:
        """[B, K] the current block's ids (a view: writing it writes the batch)."""
        return self.ids[:, self.block_start : self.block_end]

    def run(
        self,
        lo: int,
        hi: int,
        kv: KVCache | RowWindow | Overlay | None = None,
        rows: int | None = None,
    ) -> torch.Tensor:
        """The block's logits [B, K, V] from feeding columns [lo, hi) (over `kv` if given; with
        a logit shift, [lo, hi) must hold the column before the block). Guided rows also run
        their unconditional copies; soft inputs replace masked block inputs. rows: only rows
        [0, rows) (`kv` then holds just theirs; a batch with guided rows runs them all)."""
        g = self.guidance
        n = self.rows if rows is None else rows
        some = slice(0, n) if n < self.rows else None
        if some is not None and len(g):
            raise ValueError("a batch with guided rows runs all of them")
        self._count_fed(lo, hi, 0, None if some is None else n)
        ids = g.extend_ids(self.ids[:n, lo:hi], self.in_prompt[:n, lo:hi], self.mask_id)
        positions = g.extend(self.positions[:n, lo:hi])
        real = g.extend(self.real[:n])
        if self.model.block_causal:
            keys = g.extend(self.positions[:n])
            real = block_causal_mask(positions, keys, self.block_length, real)
        first = self.block_start - self.shift - lo  # the column whose logits predict the block
        logits = self.model(
            ids,
            positions,
            real,
            cache=kv,
            start=lo,
            inputs_embeds=self._inputs(ids, lo, some),
            logit_columns=slice(first, first + self.block_length),
        )
        return g.combine(logits)

    def run_full(self, kv: KVCache | None = None, first_row: int = 0) -> torch.Tensor:
        """run(0, length, kv) for rows [first_row, B), in row chunks of at most `chunk_slots`
        token slots when that is set (and no row is guided): each chunk feeds only the columns
        its rows' real tokens span, so rows of different lengths do not pay for the longest
        row's layout, and a forward stays the size this device computes fastest. Cache columns
        a chunk does not feed are its rows' padding: zeroed (hidden from attention, but 0 x NaN
        is NaN)."""
        chunks = self.chunks(first_row)
        if first_row == 0 and (len(chunks) == 1 or len(self.guidance)):
            return self.run(0, self.length, kv)
        return torch.cat([self._run_rows(*chunk, kv) for chunk in chunks])

    def chunks(self, first_row: int = 0) -> list[tuple[int, int, int, int]]:
        """(first row, end row, first column, end column) of each chunk of run_full: rows in
        order from `first_row`, a chunk grown while rows x columns stays within chunk_slots
        (0: one chunk, over every column for all rows, else over the rows' own)."""
        if self.chunk_slots <= 0:
            if first_row == 0:
                return [(0, self.rows, 0, self.length)]
            lo, hi = min(self.row_start[first_row:]), max(self.row_end[first_row:])
            return [(first_row, self.rows, lo, hi)]
        out = []
        r0 = first_row
        while r0 < self.rows:
            r1, c0, c1 = r0 + 1, self.row_start[r0], self.row_end[r0]
            while r1 < self.rows:
                n0, n1 = min(c0, self.row_start[r1]), max(c1, self.row_end[r1])
                if (r1 + 1 - r0) * (n1 - n0) > self.chunk_slots:
                    break
                r1, c0, c1 = r1 + 1, n0, n1
            out.append((r0, r1, c0, c1))
            r0 = r1
        return out

    def _run_rows(self, r0: int, r1: int, c0: int, c1: int, kv: KVCache | None) -> torch.Tensor:
        """The block's logits of rows [r0, r1) from feeding their columns [c0, c1)."""
        self._count_fed(c0, c1, r0, r1)
        ids = self.ids[r0:r1, c0:c1]
        positions = self.positions[r0:r1, c0:c1]
        window: RowWindow | None = None
        if kv is None:
            real, key_positions = self.real[r0:r1, c0:c1], positions
        else:
            real, key_positions = self.real[r0:r1], self.positions[r0:r1]
            window = kv.row_window(r0, r1)
            window.clear_outside(c0, c1)
        if self.model.block_causal:
            real = block_causal_mask(positions, key_positions, self.block_length, real)
        embeds = self._inputs(ids, c0, slice(r0, r1))
        first = self.block_start - self.shift - c0
        return self.model(
            ids,
            positions,
            real,
            cache=window,
            start=c0,
            inputs_embeds=embeds,
            logit_columns=slice(first, first + self.block_length),
        )

    def _count_fed(self, lo: int, hi: int, r0: int = 0, r1: int | None = None) -> None:
        """Count the token slots of feeding [lo, hi) to rows [r0, r1) and the real ones among
        them, from the rows' spans on the host (no sync); a guided row's copy counts as its row
        again."""
        spans = list(zip(self.row_start, self.row_end))[r0:r1]
        real = [max(0, min(hi, b) - max(lo, a)) for a, b in spans]
        if r0 == 0 and r1 is None:
            real += [real[i] for i in self.guidance.host_rows]
        self.fed += (hi - lo) * len(real)
        self.fed_real += sum(real)

    def set_soft(self, logits: torch.Tensor, masked: torch.Tensor, steps: torch.Tensor) -> None:
        """Soft diffusion: a still-masked block position's next input is
        E[mask] + w * sum_v softmax(logits)_v E[v], with w = min(0.15 + 0.02 step, 0.3) at each
        row's step (`steps` [B]), in at least float32 as a Python float weight would be."""
        block = self.block()
        mask_row = self.model.embed(block.new_full((1,), self.mask_id))
        mixed = expected_embedding(logits, self.model.embed_weight)
        weight = (0.15 + 0.02 * steps.double()).clamp(max=0.3)[:, None, None]
        weight = weight.to(torch.promote_types(mixed.dtype, torch.float32))
        soft = mask_row + (weight * mixed).to(mixed.dtype)
        plain = self.model.embed(block)
        use = masked & self.soft_rows[:, None]
        self.soft = torch.where(use[..., None], soft, plain)

    def _inputs(
        self, ids: torch.Tensor, start: int, rows: slice | None = None
    ) -> torch.Tensor | None:
        if self.soft is None:
            return None
        soft = self.guidance.extend(self.soft) if rows is None else self.soft[rows]
        embeds = self.model.embed(ids)
        lo, hi = max(self.block_start, start), min(self.block_end, start + ids.shape[1])
        if lo < hi:
            C = self.block_start
            embeds[:, lo - start : hi - start] = soft[:, lo - C : hi - C]
        return embeds


@dataclass
class StepUpdate:
    """What one step changed for one request."""

    seq: Sequence
    block: int
    block_tokens: list[int]
    newly_committed: list[int]  # offsets inside the block
    block_final: bool
    revised: list[int] = field(default_factory=list)  # offsets an edit changed this step
    # per block_tokens position: the probability it was committed (or last revised) with; 0 for
    # undecided positions; None where not reported
    confidence: list[float] | None = None


# a round takes rows while its layout stays within this many times its longest row's span
MAX_WIDENING = 2.0


def _by_layout(seqs: list[Sequence]) -> list[Sequence]:
    """`seqs` by how many tokens they lay out before their block, most first: rows whose real
    tokens start at nearby columns end up next to each other (and share Batch.run_full chunks)."""
    return sorted(seqs, key=lambda s: -(len(s.prompt) + s.block * s.params.block_length))


def _ends_early(seq: Sequence) -> tuple[bool, bool]:
    """Whether `seq`'s block may end once its answer part is final (BlockRound._answer_final):
    at an EOS (early stop), and as the window's last block; with an editing decoder only if no
    edit can pass its threshold (edit_threshold 1), as its commits are final then."""
    final = not seq.params.revises or seq.params.edit_threshold >= 1.0
    return seq.params.early_stop and final, seq.block == seq.num_blocks - 1 and final


class BlockRound:
    """Runs a block for each of `seqs` (same block_length and cache policy), one forward per
    `step()`; rows leave when done with their block and others join starting theirs (`join`).

    The host looks at the rows only every `steps_per_check` steps (dInfer's loop unrolling):
    the steps in between are queued without a host sync (workers/nosync.py checks it; a row
    done early computes but commits nothing). report: at each check, an update for every row
    that had work since the last one (streaming; with steps_per_check > 1 it carries the latest
    block and every position committed or revised since the last check); without it, updates
    come only for rows done with the block."""

    # per-row tensors [B] or [B, K] (BlockRound._row_state makes them; rows leave and join)
    suppress_eos: torch.Tensor
    ends_at_eos: torch.Tensor  # the block may end at an EOS (see _answer_final)
    last_block: torch.Tensor  # the window's last block (may end once the answer is committed)
    answer_columns: torch.Tensor  # [B, K] the block's answer positions
    row_done: torch.Tensor
    block_seeds: torch.Tensor
    row_step: torch.Tensor  # each row's step in its block
    # counters stay on the device; copied to the requests when the block ends
    forwards: torch.Tensor
    committed: torch.Tensor
    edits: torch.Tensor
    confidence: torch.Tensor  # [B, K] streamed confidence of each position's token
    # what changed since the last check (reported there)
    pending_work: torch.Tensor
    pending_commit: torch.Tensor
    pending_revised: torch.Tensor

    def __init__(
        self,
        model: DiffusionModel,
        seqs: list[Sequence],
        policy: CachePolicy,
        report: bool = True,
        steps_per_check: int = 1,
        chunk_slots: int = 0,
        graphs: StepGraphs | None = None,
    ):
        """steps_per_check: an integer >= 1 (the Scheduler checks it, default_steps_per_check).
        chunk_slots: full forwards run in row chunks of at most this many token slots
        (Batch.run_full; 0: one forward); the rows are then ordered by their layout. graphs:
        the steps after a block's first run through it (static shapes, CUDA graphs on a GPU;
        workers/graphs.py), the layout then padded to its column multiple; None: eager."""
        cfg = model.config
        device = model.lm_head_weight.device
        self.device = device
        if chunk_slots > 0:
            seqs = _by_layout(seqs)
        self.seqs = seqs
        self.policy = policy
        self.mask_id: int = cfg.mask_token_id
        self.eos_id: int = cfg.eos_token_id
        self.graphs = graphs
        align = 1 if graphs is None else COLUMNS
        self.batch = Batch(model, seqs, self.mask_id, self.eos_id, align)
        self.batch.chunk_slots = chunk_slots
        self.decoders = DecoderSet([s.params for s in seqs], device)
        state = self._row_state(seqs)
        self.row_state = list(state)  # the names of the per-row tensors
        for name, value in state.items():
            setattr(self, name, value)
        self.any_suppress = any(s.params.suppress_eos for s in seqs)
        self.any_soft = any(s.params.soft_diffusion for s in seqs)
        self.any_ends_early = any(any(_ends_early(s)) for s in seqs)
        self.fresh = 0  # rows [fresh, B) are at their block's first step (none: B)
        self.started = [0] * len(seqs)  # the step index at which each row began its block
        self.block_steps: list[int] = []  # steps the blocks that ended here took
        self.closed = False  # takes no more rows (the Scheduler's decision)
        self.report = report
        self.steps_per_check = steps_per_check
        self.step_index = 0
        self.finished = False
        self.left: list[Sequence] = []  # rows done with the block that left at the last step

    def _row_state(self, seqs: list[Sequence]) -> dict[str, torch.Tensor]:
        """The per-row tensors of rows `seqs` at their block's first step, by attribute name."""
        device, K = self.device, self.batch.block_length
        B = len(seqs)
        at_eos, last = zip(*map(_ends_early, seqs))
        spans = [[c - s.block * K for c in s.span(s.block)] for s in seqs]
        column = torch.arange(K, device=device)[None]
        lo, hi = torch.tensor(spans, dtype=torch.long, device=device).reshape(B, 2).T[..., None]
        seeds = [block_seed(s.seed, s.block) for s in seqs]
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        no = torch.zeros(B, K, dtype=torch.bool, device=device)
        return {
            "suppress_eos": torch.tensor([s.params.suppress_eos for s in seqs], device=device),
            "ends_at_eos": torch.tensor(at_eos, dtype=torch.bool, device=device),
            "last_block": torch.tensor(last, dtype=torch.bool, device=device),
            "answer_columns": (column >= lo) & (column < hi),
            "row_done": torch.zeros(B, dtype=torch.bool, device=device),
            "block_seeds": torch.tensor(seeds, dtype=torch.long, device=device),
            "row_step": zeros,
            "forwards": zeros.clone(),
            "committed": zeros.clone(),
            "edits": zeros.clone(),
            "confidence": torch.zeros(B, K, dtype=torch.float64, device=device),
            "pending_work": torch.zeros(B, dtype=torch.bool, device=device),
            "pending_commit": no,
            "pending_revised": no.clone(),
        }

    def drop(self, leaving: set[int]) -> list[StepUpdate]:
        """Remove the rows at `leaving` before the next step; their cache rows are released. If
        every row left is then done with the block, the round finishes: returned are the
        updates the others had pending since the last check (none with steps_per_check 1)."""
        kept = [i for i in range(len(self.seqs)) if i not in leaving]
        rows = torch.tensor(kept, dtype=torch.long, device=self.device)
        self.seqs = [self.seqs[i] for i in kept]
        self.started = [self.started[i] for i in kept]
        self.fresh = sum(i < self.fresh for i in kept)  # the order is kept
        self.policy.keep_rows(self.batch.keep(rows, self.seqs))
        self.decoders.keep(rows)
        for name in self.row_state:
            setattr(self, name, getattr(self, name)[rows])
        if self.seqs and bool(self.row_done.all()):
            self.block_steps += [self.step_index - s for s in self.started]
            self.finished = True
            updates = self._updates()
            self._finish()
            return updates
        return []

    @property
    def checked(self) -> bool:
        """The last step was a host check (rows may join now): not before the first step."""
        return self.step_index > 0 and self.step_index % self.steps_per_check == 0

    def joinable(self, ready: list[Sequence]) -> list[Sequence]:
        """Those of `ready` (requests of this round's group, at a block boundary) that may
        join now, in order: not with guidance (its copies' rows follow the batch's), not where
        the policy keeps per-round state (`joins`), and only where the widened layout costs no
        row more token slots a step (the policy's `step_width`) than before, or than the
        joining row alone (true of dual and vicinity, whose steps feed about the block; prefix
        and none feed to the layout's end, so a row joins those only where that costs nothing),
        and stays within MAX_WIDENING times its longest row's span (a layout never narrows
        while its round runs: beyond that, the round closes and the next one is laid out anew)."""
        batch, K = self.batch, self.batch.block_length
        if not self.policy.joins or len(batch.guidance):
            return []
        width = self.policy.step_width
        present = width(batch.block_start, batch.length, K)
        longest = max(end - start for start, end in zip(batch.row_start, batch.row_end))
        joining: list[Sequence] = []
        for seq in ready:
            if seq.params.cfg_scale > 0:
                continue
            C, length = batch.layout_with([*joining, seq])
            alone = width(*batch.layout_with([seq], empty=True), K)
            span = batch.span(seq)
            if width(C, length, K) > min(present, alone):
                continue
            if length > MAX_WIDENING * max(longest, span):
                continue
            joining.append(seq)
            longest = max(longest, span)
        return joining

    def join(self, seqs: list[Sequence]) -> None:
        """Requests `seqs` (joinable ones) start their current block in this round: they follow
        the present rows, and the next step is their first."""
        if self.batch.chunk_slots > 0:
            seqs = _by_layout(seqs)
        present = len(self.seqs)
        moved = self.batch.join(seqs)
        self.policy.add_rows(self.batch, moved)
        self.decoders.join([s.params for s in seqs])
        state = self._row_state(seqs)
        for name in self.row_state:
            setattr(self, name, torch.cat([getattr(self, name), state[name]]))
        self.seqs = self.seqs + seqs
        self.started += [self.step_index] * len(seqs)
        self.fresh = present
        self.any_suppress |= any(s.params.suppress_eos for s in seqs)
        self.any_soft |= any(s.params.soft_diffusion for s in seqs)
        self.any_ends_early |= any(any(_ends_early(s)) for s in seqs)

    def step(self) -> list[StepUpdate]:
        """One forward and its commits. Every `steps_per_check` steps the host looks at which
        rows are done: all of them end the round; some leave it now (`left`: their blocks are in
        their requests) instead of idling until the slowest row is done."""
        self.left = []
        with step_region(self.device):
            if self.graphs is None:
                self._decode()
            else:
                self.graphs.step(self)
        if self.step_index % self.steps_per_check:  # no host check: nothing to report either
            return []
        done = [i for i, d in enumerate(self.row_done.tolist()) if d]  # the host sync
        self.block_steps += [self.step_index - self.started[i] for i in done]
        if len(done) == len(self.seqs):
            self.finished = True
            updates = self._updates()
            self._finish()
            return updates
        updates = self._updates(None if self.report else done)
        if done:
            self._write_back(done)
            self.left = [self.seqs[i] for i in done]
            self.drop(set(done))
        return updates

    def _decode(self) -> None:
        """One forward, the decoders' picks committed into the batch, counters and the pending
        updates updated, the next soft inputs prepared: tensor ops only, no host sync."""
        batch, steps = self.batch, self.row_step
        logits = self.policy.block_logits(batch, self.fresh)
        suppress = self.suppress_eos if self.any_suppress else None
        logits = forbid_tokens(logits, self.mask_id, self.eos_id, suppress)
        block = batch.block()
        masked = block == self.mask_id
        seeds = step_seeds(self.block_seeds, steps)
        token, written = self.decoders.select(logits, masked, steps, seeds, block)
        working = ~self.row_done
        written &= working[:, None]
        if self.report and self.decoders.confidence is not None:
            self.confidence = torch.where(written, self.decoders.confidence, self.confidence)
        block.copy_(torch.where(written, token, block))
        commit, revised = written & masked, written & ~masked
        self.forwards += working  # a forward counts for a request only while it still had work
        self.committed += commit.sum(-1)
        self.edits += revised.sum(-1)
        self.pending_work |= working
        self.pending_commit |= commit
        self.pending_revised |= revised
        still_masked = masked & ~commit
        done = self.decoders.done(steps + 1, still_masked)
        if self.any_ends_early:
            done |= self._answer_final(block, still_masked)
        self.row_done |= done
        if self.any_soft:
            batch.set_soft(logits, still_masked, steps)
        self.row_step += 1
        self.step_index += 1
        self.fresh = len(self.seqs)

    def _answer_final(self, block: torch.Tensor, still_masked: torch.Tensor) -> torch.Tensor:
        """[B] rows whose answer is final although the block still has masks: with early stop,
        an EOS is committed in the block's answer part with every position before it committed;
        in the window's last block, every answer position is committed (a block-causal model's
        window runs past the answer to the block's end). Nothing a later step commits can change
        the answer then, so the block ends now; its masked positions become EOS, as the rest of
        the window does when the block ends (Scheduler._end_block). Tensor ops only."""
        eos = (block == self.eos_id) & self.answer_columns
        after = eos.cumsum(-1) > 0  # at or after the first EOS
        final = self.ends_at_eos & eos.any(-1) & ~(still_masked & ~after).any(-1)
        final |= self.last_block & ~(still_masked & self.answer_columns).any(-1)
        fill = final[:, None] & still_masked
        block.copy_(torch.where(fill, self.eos_id, block))
        self.committed += fill.sum(-1)
        self.pending_commit |= fill
        return final

    def _updates(self, only: list[int] | None = None) -> list[StepUpdate]:
        """What changed for each request since the last check (`only` those rows; without
        reporting, those rows' final state), limited to the block's answer positions; rows done
        with the block say so (block_final). One copy to the host."""
        K = self.batch.block_length
        state = torch.cat(
            [
                self.batch.block(),
                self.pending_commit.long(),
                self.pending_revised.long(),
                self.pending_work.long()[:, None],
                self.row_done.long()[:, None],
            ],
            dim=1,
        ).tolist()
        confidence = self.confidence.tolist() if self.report else None
        rows = range(len(self.seqs)) if only is None else only
        updates = []
        for i in rows:
            block, commits, revisions = state[i][:K], state[i][K : 2 * K], state[i][2 * K : 3 * K]
            work, done = state[i][3 * K], state[i][3 * K + 1]
            if not (work or self.finished or not self.report):
                continue
            s = self.seqs[i]
            lo, hi = s.span(s.block)
            a, b = lo - s.block * K, hi - s.block * K  # the answer part, as block offsets
            offsets = [j - a for j in range(a, b) if commits[j]]
            edited = [j - a for j in range(a, b) if revisions[j]]
            conf = None if confidence is None else confidence[i][a:b]
            updates.append(StepUpdate(s, s.block, block[a:b], offsets, bool(done), edited, conf))
        self.pending_work.zero_()
        self.pending_commit.zero_()
        self.pending_revised.zero_()
        return updates

    def _write_back(self, rows: list[int]) -> None:
        """Copy the block and counters of `rows` into their requests; the policy keeps what it
        keeps of them."""
        K = self.batch.block_length
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        state = torch.cat(
            [
                self.batch.block()[index],
                self.forwards[index, None],
                self.committed[index, None],
                self.edits[index, None],
            ],
            dim=1,
        ).tolist()
        for r, row in zip(rows, state):
            s = self.seqs[r]
            s.window[s.block * K : (s.block + 1) * K] = row[:K]
            s.forwards += row[K]
            s.committed += row[K + 1]
            s.edits += row[K + 2]
        self.policy.end_block(self.batch, rows)

    def _finish(self) -> None:
        """Every row has finished the block: write the blocks back into the requests' windows."""
        self.finished = True
        self.decoders.end_block()
        self._write_back(list(range(len(self.seqs))))

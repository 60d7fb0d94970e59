"""SamplingParams: how one request is denoised. A msgspec Struct: it travels on the wire as is."""

from __future__ import annotations

import math

import msgspec

from dinfer_async.errors import InvalidRequestError

DECODERS = ("fixed", "threshold", "factor", "hierarchical", "credit", "joint")
EDITING_DECODERS = ("joint",)  # decoders that may change committed tokens of the current block
CACHES = ("none", "prefix", "dual", "vicinity")
REMASKING = ("low_confidence", "random")
MAX_STOP, MAX_STOP_LENGTH = 8, 256  # like OpenAI's limit of 4 stop strings, with room

# LLaDA2.1's two decoding modes for decoder="joint" (SamplingParams.preset(name, **overrides)).
# Values: the LLaDA2.1 model card (huggingface.co/inclusionAI/LLaDA2.1-mini, "S Mode" / "Q Mode"),
# speedy: threshold 0.5, editing_threshold 0.0; quality: threshold 0.7, editing_threshold 0.5;
# max_post_steps 16 and block_length 32 in both (also the Diffusers LLaDA2 pipeline's example:
# threshold 0.7, editing_threshold 0.5, max_post_steps 16). The rule follows SGLang's
# JointThreshold (in sglang.srt.dllm.algorithm; its defaults: threshold 0.5,
# edit_threshold 0, max_post_edit_steps 16): edit where p > edit_threshold, so 0.0 edits whenever
# the top token changes (Diffusers' pipeline instead reads editing_threshold 0 as "off").
JOINT_PRESETS: dict[str, dict[str, float | int | str]] = {
    "speedy": dict(
        decoder="joint", block_length=32, threshold=0.5, edit_threshold=0.0, max_edit_steps=16
    ),
    "quality": dict(
        decoder="joint", block_length=32, threshold=0.7, edit_threshold=0.5, max_edit_steps=16
    ),
}


class SamplingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Defaults are the fast configuration; `decoder="fixed", cache="none"` is LLaDA's sampler.

    gen_length: tokens generated (EOS padding included), a multiple of block_length.
    block_length: tokens denoised together; blocks run left to right (semi-autoregressive).
    decoder / threshold: which masked positions are committed at each step.
    steps: "fixed" only; total denoising steps over gen_length (LLaDA's steps; default gen_length).
    cache: KV-cache policy. temperature: 0 is greedy; > 0 samples by Gumbel-max with `seed`.
    remasking: "fixed" only; commit the most confident positions or random ones.
    early_stop: stop after the first block that contains EOS; the rest is EOS. That block ends
        as soon as every position before its first EOS is committed (the answer is final then;
        not with the joint decoder, whose edits can still change it).
    cfg_scale: classifier-free guidance (the unconditional run masks the prompt); 0 disables.
    suppress_eos: never predict EOS (the answer fills gen_length).
    factor: "factor" decoder's f: commit the largest n with (n + 1)(1 - c_n) < f.
    low_threshold: "hierarchical" decoder: a contiguous run of masks commits its best above this.
    credit_alpha, credit_gamma, credit_beta: "credit" decoder: decode on
        logits + alpha * log(1 + credit), credit <- beta * credit + p^gamma at each prediction.
    prefix_look, after_look: "vicinity" cache: tokens recomputed before and after the block.
    suffix_window: how many of the window's positions after the current block the model sees
        (DPad's sliding window: a refresh then costs prompt + decoded blocks + block + this, not
        the whole window); None: all of them, as LLaDA's sampler does. Faster on long windows,
        different tokens (an approximation, measured in benchmarks/RESULTS.md); 0: none. No
        effect on block-causal models (LLaDA2), which never see past the block.
    soft_diffusion: feed still-masked positions E[mask] + w * E[softmax(logits)] at the next step.
    max_tokens: OpenAI's name for the answer's length; when set it decides gen_length, rounded
        up to whole blocks (max_tokens=40, block_length=32: gen_length=64); gen_length is ignored.
    stop: strings that end the answer: it is cut before the first one, decoding stops after the
        block that completes it, and finish_reason is "stop".
    edit_threshold: "joint" decoder (LLaDA2.1 token editing): a committed position of the current
        block is replaced by the predicted token when that differs and its probability is
        > edit_threshold (0: whenever the top token changes; 1: never).
    max_edit_steps: "joint": edit rounds per block once no mask is left; the block ends after a
        round without edits or after this many rounds.
    """

    gen_length: int = 256
    block_length: int = 32
    decoder: str = "threshold"
    threshold: float = 0.9
    steps: int | None = None
    cache: str = "dual"
    temperature: float = 0.0
    seed: int | None = None
    remasking: str = "low_confidence"
    early_stop: bool = True
    cfg_scale: float = 0.0
    suppress_eos: bool = False
    factor: float = 1.0
    low_threshold: float = 0.6
    credit_alpha: float = 0.7
    credit_gamma: float = 0.2
    credit_beta: float = 0.8
    prefix_look: int = 16
    after_look: int = 16
    suffix_window: int | None = None
    soft_diffusion: bool = False
    max_tokens: int | None = None
    stop: list[str] | None = None
    edit_threshold: float = 0.5
    max_edit_steps: int = 16

    @classmethod
    def preset(cls, name: str, **overrides) -> SamplingParams:
        """One of JOINT_PRESETS (LLaDA2.1's "speedy" and "quality" modes), fields overridable."""
        if name not in JOINT_PRESETS:
            raise InvalidRequestError(
                "preset", f"{name!r} is not one of {', '.join(JOINT_PRESETS)}"
            )
        return cls(**{**JOINT_PRESETS[name], **overrides})

    @property
    def revises(self) -> bool:
        """The decoder may change committed tokens of the block being decoded (until it ends)."""
        return self.decoder in EDITING_DECODERS

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def total_steps(self) -> int:
        """Steps of the "fixed" decoder over the whole generation."""
        return self.gen_length if self.steps is None else self.steps

    def validate(self, max_gen_length: int | None = None) -> SamplingParams:
        """Raise InvalidRequestError naming the first bad field; return the params to run (self,
        or a copy whose gen_length follows max_tokens)."""
        if self.max_tokens is not None:
            _int_at_least("max_tokens", self.max_tokens, 1)
            _int_at_least("block_length", self.block_length, 1)
            blocks = -(-self.max_tokens // self.block_length)
            if self.gen_length != blocks * self.block_length:
                return msgspec.structs.replace(
                    self, gen_length=blocks * self.block_length
                ).validate(max_gen_length)
        if self.stop is not None:
            if not isinstance(self.stop, list) or not 1 <= len(self.stop) <= MAX_STOP:
                raise InvalidRequestError("stop", f"must be a list of 1 to {MAX_STOP} strings")
            for i, text in enumerate(self.stop):
                if not isinstance(text, str) or not text or len(text) > MAX_STOP_LENGTH:
                    raise InvalidRequestError(
                        f"stop[{i}]",
                        f"must be a non-empty string of at most {MAX_STOP_LENGTH} characters",
                    )
        _int_at_least("gen_length", self.gen_length, 1)
        _int_at_least("block_length", self.block_length, 1)
        if max_gen_length is not None and self.gen_length > max_gen_length:
            raise InvalidRequestError(
                "gen_length", f"{self.gen_length} exceeds this model's limit of {max_gen_length}"
            )
        if self.gen_length % self.block_length:
            raise InvalidRequestError(
                "gen_length",
                f"{self.gen_length} is not a multiple of block_length={self.block_length}; "
                f"use e.g. gen_length={self.num_blocks * self.block_length or self.block_length}",
            )
        _choice("decoder", self.decoder, DECODERS)
        _choice("cache", self.cache, CACHES)
        _choice("remasking", self.remasking, REMASKING)
        if not _is_number(self.threshold) or not 0.0 < self.threshold <= 1.0:
            raise InvalidRequestError("threshold", f"{self.threshold!r} must be in (0, 1]")
        if not _is_number(self.edit_threshold) or not 0.0 <= self.edit_threshold <= 1.0:
            raise InvalidRequestError(
                "edit_threshold", f"{self.edit_threshold!r} must be in [0, 1]"
            )
        _int_at_least("max_edit_steps", self.max_edit_steps, 0)
        if not _is_number(self.low_threshold) or not 0.0 < self.low_threshold <= 1.0:
            raise InvalidRequestError("low_threshold", f"{self.low_threshold!r} must be in (0, 1]")
        for name in ("factor", "credit_alpha", "credit_gamma"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise InvalidRequestError(name, f"{value!r} must be a finite number > 0")
        if not _is_number(self.credit_beta) or not 0.0 <= self.credit_beta <= 1.0:
            raise InvalidRequestError("credit_beta", f"{self.credit_beta!r} must be in [0, 1]")
        _int_at_least("prefix_look", self.prefix_look, 0)
        _int_at_least("after_look", self.after_look, 0)
        if self.suffix_window is not None:
            _int_at_least("suffix_window", self.suffix_window, 0)
        if self.steps is not None:
            _int_at_least("steps", self.steps, 1)
            if self.steps % self.num_blocks:
                raise InvalidRequestError(
                    "steps",
                    f"{self.steps} must be a multiple of the number of blocks "
                    f"(gen_length / block_length = {self.num_blocks})",
                )
        if (
            not _is_number(self.temperature)
            or self.temperature < 0
            or not math.isfinite(self.temperature)
        ):
            raise InvalidRequestError(
                "temperature", f"{self.temperature!r} must be a finite number >= 0"
            )
        if (
            not _is_number(self.cfg_scale)
            or self.cfg_scale < 0
            or not math.isfinite(self.cfg_scale)
        ):
            raise InvalidRequestError(
                "cfg_scale", f"{self.cfg_scale!r} must be a finite number >= 0"
            )
        if self.seed is not None and (type(self.seed) is not int or not 0 <= self.seed < 2**63):
            raise InvalidRequestError(
                "seed", f"{self.seed!r} must be an integer in [0, 2**63) or None"
            )
        for name in ("early_stop", "suppress_eos", "soft_diffusion"):
            if type(getattr(self, name)) is not bool:
                raise InvalidRequestError(name, f"{getattr(self, name)!r} must be true or false")
        return self


def _is_number(value) -> bool:
    return type(value) in (int, float)


def _int_at_least(name: str, value, low: int) -> None:
    if type(value) is not int or value < low:
        raise InvalidRequestError(name, f"{value!r} must be an integer >= {low}")


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidRequestError(name, f"{value!r} is not one of {', '.join(allowed)}")

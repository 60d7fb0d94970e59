"""Command-line flags shared by dinfer-batch, dinfer-serve and dinfer-worker, in one place.

Every SamplingParams field is a flag of the same name (dashes for underscores), with its type,
its choices and a help line taken from the SamplingParams docstring; a flag left out keeps the
SamplingParams default. Engine flags (model, workers, device, dtype, ...) are listed once here.
"""

from __future__ import annotations

import argparse
import logging
import re
import types
import typing

from dinfer_async import params as sp
from dinfer_async.logs import setup_logging
from dinfer_async.params import SamplingParams
from dinfer_async.validation import EP_DISPATCHES

DTYPES = ("float32", "float64", "bfloat16", "float16")
CHOICES = {"decoder": sp.DECODERS, "cache": sp.CACHES, "remasking": sp.REMASKING}


def _field_help() -> dict[str, str]:
    """The `name: text` entries of SamplingParams' docstring (a line may name several fields)."""
    found: dict[str, str] = {}
    entry = re.compile(r"^    ([a-z_, /]+): (.*)$")
    names: list[str] = []
    for line in (SamplingParams.__doc__ or "").splitlines():
        m = entry.match(line)
        if m:
            names = [n.strip() for n in re.split(r"[,/]", m.group(1)) if n.strip()]
            for n in names:
                found[n] = m.group(2).strip()
        elif names and line.startswith("        "):
            for n in names:
                found[n] += " " + line.strip()
        else:
            names = []
    return found


def _base_type(annotation) -> type:
    """int | None -> int; list[str] | None -> list (a repeated flag)."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per SamplingParams field, in a group of its own."""
    group = parser.add_argument_group("sampling (defaults for every request; see SamplingParams)")
    helps, defaults = _field_help(), SamplingParams()
    for name, annotation in SamplingParams.__annotations__.items():
        kind = _base_type(annotation)
        text = f"{helps.get(name, '')} (default: {getattr(defaults, name)!r})".strip()
        text = text.replace("%", "%%")
        if kind is list:
            group.add_argument(flag(name), action="append", default=None, metavar="TEXT", help=text)
        elif kind is bool:
            group.add_argument(flag(name), type=_bool, default=None, metavar="BOOL", help=text)
        else:
            choices = CHOICES.get(name)
            group.add_argument(flag(name), type=kind, default=None, choices=choices, help=text)


def sampling_defaults(args: argparse.Namespace) -> dict:
    """The SamplingParams fields given on the command line."""
    names = SamplingParams.__struct_fields__
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Where the model comes from and the processes that serve it."""
    parser.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model directory (default: the bundled model)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (one per GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads per worker (0: torch's default)"
    )
    add_parallel_flags(parser)


def gpu_list(text: str) -> list[int]:
    """--gpus 0,1,3: GPU indices (as CUDA numbers them in this process), no repeats."""
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give GPU numbers like 0,1,2,3") from None
    if not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct GPU numbers >= 0, like 0,1")
    return gpus


def add_parallel_flags(
    parser: argparse.ArgumentParser,
    size_default: int | None = 1,
    gpus_help: str = "with --device cuda: the GPUs to use; worker i gets the i-th T of them "
    "(default: every visible GPU)",
) -> None:
    """A worker group of T processes (tensor parallel), its experts split, the GPUs it uses."""
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=size_default,
        metavar="T",
        help="processes (GPUs) per worker: the model's heads, MLPs and vocabulary split over T "
        "ranks of one torch.distributed group (default 1)",
    )
    parser.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="MoE models: split the routed experts over the tensor-parallel ranks too",
    )
    parser.add_argument(
        "--expert-parallel-dispatch",
        choices=EP_DISPATCHES,
        default=EP_DISPATCHES[0],
        help="with --enable-expert-parallel: all_reduce (every rank runs its experts on every "
        "token, one all-reduce; the small-batch choice) or all_to_all (tokens sent to their "
        "experts' ranks and back)",
    )
    parser.add_argument(
        "--gpus",
        type=gpu_list,
        default=None,
        metavar="0,1,..",
        help=gpus_help,
    )


def expert_parallel(args: argparse.Namespace) -> bool | str:
    """The Client's and Engine's `expert_parallel` from --enable-expert-parallel and
    --expert-parallel-dispatch: False, or the dispatch's name."""
    return args.expert_parallel_dispatch if args.enable_expert_parallel else False


def flag(field: str) -> str:
    """The command-line flag of a field or keyword argument: max_tokens -> --max-tokens."""
    return "--" + field.replace("_", "-")


def engine_flags_problem(
    args: argparse.Namespace, counts: tuple[str, ...] = ("workers", "tensor_parallel_size")
) -> str | None:
    """What is wrong with the engine flags, in their names (the Client's own checks, which run
    later, name its keyword arguments), or None. counts: the flags that must be >= 1."""
    for name in counts:
        if getattr(args, name) < 1:
            return f"{flag(name)}: must be >= 1"
    return expert_parallel_problem(args.enable_expert_parallel, args.tensor_parallel_size)


def expert_parallel_problem(enabled: bool, group_size: int) -> str | None:
    """--enable-expert-parallel needs a group of 2 or more ranks to split the experts over."""
    if enabled and group_size == 1:
        return (
            "--enable-expert-parallel splits the experts over the tensor-parallel ranks: "
            "add --tensor-parallel-size 2 (or more)"
        )
    return None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: what is wrong (see --help)`)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def add_common_flags(parser: argparse.ArgumentParser, prog: str) -> None:
    """--version and --debug, the same on every command."""
    from dinfer_async import __version__

    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="log at debug level and show tracebacks (also: DINFER_LOG_LEVEL=debug)",
    )


def configure_logging(prog: str, debug: bool = False) -> bool:
    """Log to stderr as `prog: message` at DINFER_LOG_LEVEL (--debug forces debug); return
    whether tracebacks are shown (debug level only)."""
    return setup_logging(prog=prog, debug=debug) <= logging.DEBUG

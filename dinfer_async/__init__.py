"""dinfer-async: the client SDK for diffusion language models. Importing it never imports torch."""

from dinfer_async.client import Client, Completion
from dinfer_async.errors import (
    ClientClosedError,
    ConnectError,
    DinferError,
    DinferTimeoutError,
    InvalidRequestError,
    WorkerDiedError,
    WorkerError,
    WorkerMismatchError,
    WorkerUnresponsiveError,
)
from dinfer_async.params import SamplingParams
from dinfer_async.protocol import Chunk

__all__ = [
    "Chunk",
    "Client",
    "ClientClosedError",
    "Completion",
    "ConnectError",
    "DinferError",
    "DinferTimeoutError",
    "InvalidRequestError",
    "SamplingParams",
    "WorkerDiedError",
    "WorkerError",
    "WorkerMismatchError",
    "WorkerUnresponsiveError",
]
__version__ = "0.1.0"

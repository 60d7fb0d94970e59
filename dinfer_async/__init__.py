"""dinfer-async: the client SDK for diffusion language models. Importing it never imports torch."""

from dinfer_async.client import Client, Completion
from dinfer_async.errors import (
    ClientClosedError,
    DinferError,
    InvalidRequestError,
    WorkerDiedError,
    WorkerError,
)
from dinfer_async.params import SamplingParams
from dinfer_async.protocol import Chunk

__all__ = [
    "Chunk",
    "Client",
    "ClientClosedError",
    "Completion",
    "DinferError",
    "InvalidRequestError",
    "SamplingParams",
    "WorkerDiedError",
    "WorkerError",
]
__version__ = "0.1.0"

"""dinfer-async: the client SDK for diffusion language models. Importing it never imports torch."""

from dinfer_async.errors import DinferError, InvalidRequestError
from dinfer_async.params import SamplingParams

__all__ = ["DinferError", "InvalidRequestError", "SamplingParams"]
__version__ = "0.1.0"

"""Error types shared by the client, the batch CLI and the workers. Importing this never imports
torch."""


class DinferError(Exception):
    """Base of every error dinfer-async raises on purpose."""


class InvalidRequestError(DinferError, ValueError):
    """A request or a parameter is invalid. `field` names it; the message says how to fix it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class WorkerDiedError(DinferError):
    """The worker serving this request exited; the client restarts it, so a retry can succeed."""


class WorkerError(DinferError):
    """The worker failed while running this request (not the request's fault)."""


class ClientClosedError(DinferError):
    """The client was closed while this request was running."""

"""Error types shared by the client, the batch CLI and the workers (importing this never imports
torch)."""


class DinferError(Exception):
    """Base of every error dinfer-async raises on purpose."""


class InvalidRequestError(DinferError, ValueError):
    """A request or a parameter is invalid. `field` names it; the message says how to fix it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class WorkerDiedError(DinferError):
    """The worker serving this request exited or lost its connection; the request is lost, but
    the client restarts (or reconnects to) the worker, so a retry can succeed."""


class WorkerUnresponsiveError(WorkerDiedError):
    """The worker stopped answering heartbeats (stopped, hung or unreachable) for longer than the
    client's `heartbeat_timeout`; its requests were failed as if it had died."""


class WorkerError(DinferError):
    """The worker failed while running this request, could not be started, or was given up
    after too many restarts (not the request's fault)."""


class WorkerMismatchError(DinferError):
    """Workers of one client announced different models or tokenizers in their handshake."""


class ClientClosedError(DinferError):
    """The client was closed while this request was running (or before it was sent)."""


class DinferTimeoutError(DinferError, TimeoutError):
    """A bounded wait of the client ran out (for example `wait_ready`)."""


class ConnectError(DinferTimeoutError):
    """No worker answered the handshake at an endpoint within the connect timeout."""

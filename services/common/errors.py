"""Domain errors, each knowing its gRPC status code by name.

Cores raise these and never import grpc; one interceptor maps them
(``services/common/server.py``). Anything else becomes INTERNAL with a log line.
"""

from __future__ import annotations


class PigmentError(Exception):
    status = "INTERNAL"


class InvalidInput(PigmentError):
    status = "INVALID_ARGUMENT"


class NotFound(PigmentError):
    status = "NOT_FOUND"


class AlreadyExists(PigmentError):
    status = "ALREADY_EXISTS"


class PermissionDenied(PigmentError):
    status = "PERMISSION_DENIED"


class Unauthenticated(PigmentError):
    status = "UNAUTHENTICATED"


class Overloaded(PigmentError):
    status = "RESOURCE_EXHAUSTED"


class RateLimited(Overloaded):
    """A tenant's rate limit or quota is spent; ``retry_after_s`` travels as google.rpc.RetryInfo."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(PigmentError):
    status = "UNAVAILABLE"


class ModelNotReady(Unavailable):
    """A model or backend asked for could not be loaded; the message says why."""


class DeadlineExceeded(PigmentError):
    status = "DEADLINE_EXCEEDED"


class FailedPrecondition(PigmentError):
    status = "FAILED_PRECONDITION"


def check_range(field: str, value: float, low: float, high: float) -> None:
    """Raise InvalidInput naming the field and its allowed range."""
    if not (low <= value <= high):
        raise InvalidInput(f"{field}={value} is out of range: allowed {low}..{high}")


def to_rpc_status(exc: Exception):
    """The google.rpc.Status of an error, as gRPC and HTTP callers receive it: its code, message and details
    (RetryInfo on RateLimited). Anything not a PigmentError is INTERNAL without its text (it is logged).
    A minimal version: the structured-errors work adds BadRequest and ErrorInfo details."""
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2

    if not isinstance(exc, PigmentError):
        return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error: {type(exc).__name__} (logged)")
    status = status_pb2.Status(code=code_pb2.Code.Value(exc.status), message=str(exc)[:1000])
    if isinstance(exc, RateLimited):
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(int(max(0.0, exc.retry_after_s) * 1e9))
        detail = any_pb2.Any()
        detail.Pack(info)
        status.details.append(detail)
    return status

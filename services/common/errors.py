"""Domain errors, each knowing its gRPC status code by name, and their google.rpc.Status form.

Cores raise these and never import grpc; one interceptor maps them
(``services/common/server.py``) with ``to_rpc_status``, which the HTTP face uses too,
so a client reads the same details everywhere:

- ``ErrorInfo``: a stable ``reason`` (UPPER_SNAKE, listed in README) in domain ``pigment.dev``,
  with ``field``/``allowed`` metadata where the error is about one field;
- ``BadRequest``: one field violation per bad field (its path and what is allowed);
- ``RetryInfo``: on RESOURCE_EXHAUSTED and UNAVAILABLE, how long to wait;
- ``QuotaFailure``: when a tenant's rate limit or quota is spent.

Anything else becomes INTERNAL with a log line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the proto modules import lazily: cores import this file without them
    from google.rpc import status_pb2

DOMAIN = "pigment.dev"
DEFAULT_RETRY_S = 1.0  # RetryInfo for overload and unavailability that carry no better estimate


@dataclass(frozen=True)
class Violation:
    """One bad field: its path in the request (``interactions[3].item_id``) and what is wrong or allowed."""

    field: str
    description: str


class PigmentError(Exception):
    """``reason``: a stable ErrorInfo code (the class's by default); ``field``/``allowed``: the one bad field and
    what it allows (a BadRequest violation); ``violations``: several (e.g. one per bad row of a batch)."""

    status = "INTERNAL"
    reason = "INTERNAL"

    def __init__(self, message: str = "", *, reason: str | None = None, field: str | None = None,
                 allowed: str | None = None, violations: Sequence[Violation] = (), retry_after_s: float | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.field = field
        self.allowed = allowed
        self.violations = list(violations) or ([Violation(field, allowed or message)] if field else [])
        self.retry_after_s = retry_after_s


class InvalidInput(PigmentError):
    status = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class NotFound(PigmentError):
    status = "NOT_FOUND"
    reason = "NOT_FOUND"


class AlreadyExists(PigmentError):
    status = "ALREADY_EXISTS"
    reason = "ALREADY_EXISTS"


class PermissionDenied(PigmentError):
    status = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class Unauthenticated(PigmentError):
    status = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class Overloaded(PigmentError):
    status = "RESOURCE_EXHAUSTED"
    reason = "OVERLOADED"


class RateLimited(Overloaded):
    """A tenant's rate limit or quota is spent; ``retry_after_s`` travels as RetryInfo, the quota as QuotaFailure."""

    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after_s: float, subject: str = "", quota: str = ""):
        super().__init__(message, retry_after_s=retry_after_s)
        self.subject = subject  # who is over: "tenant:acme"
        self.quota = quota  # which limit: "images 100/hour"


class Unavailable(PigmentError):
    status = "UNAVAILABLE"
    reason = "UNAVAILABLE"


class ModelNotReady(Unavailable):
    """A model or backend asked for could not be loaded; the message says why."""

    reason = "MODEL_NOT_READY"


class DeadlineExceeded(PigmentError):
    status = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_EXCEEDED"


class FailedPrecondition(PigmentError):
    status = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


def number(value: float) -> str:
    """A number as a person writes it: 9, 2.5, 1e+20 (never Python's 9.0)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_range(field: str, value: float, low: float, high: float) -> None:
    """Raise InvalidInput naming the field and its allowed range."""
    if not (low <= value <= high):
        allowed = f"allowed {number(low)}..{number(high)}"
        raise InvalidInput(f"{field}={number(value)} is out of range: {allowed}", reason="OUT_OF_RANGE",
                           field=field, allowed=allowed)


def to_rpc_status(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for ``exc``: code, message and details (ErrorInfo always; BadRequest, RetryInfo,
    QuotaFailure where they apply). Not a PigmentError: INTERNAL with only the exception's type name."""
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2

    if not isinstance(exc, PigmentError):
        exc = PigmentError(f"internal error: {type(exc).__name__} (logged)")
    metadata = {k: v for k, v in (("field", exc.field), ("allowed", exc.allowed)) if v}
    details = [error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=metadata)]
    if exc.violations:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description, reason=exc.reason)
            for v in exc.violations[:100]]))
    if exc.status in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
        info = error_details_pb2.RetryInfo()
        wait = DEFAULT_RETRY_S if exc.retry_after_s is None else max(0.0, exc.retry_after_s)
        info.retry_delay.FromNanoseconds(int(wait * 1e9))
        details.append(info)
    if isinstance(exc, RateLimited):
        details.append(error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject=exc.subject, description=exc.quota or str(exc))]))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    # Capped: a message echoing a caller's huge value must not push the reply over header limits.
    return status_pb2.Status(code=getattr(code_pb2, exc.status), message=str(exc)[:MAX_MESSAGE], details=packed)


MAX_MESSAGE = 1000

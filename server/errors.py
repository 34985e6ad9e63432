"""Domain errors of the serving layer and the one place that maps them to gRPC status codes."""

from __future__ import annotations

import grpc

from server.bundle import BundleError
from server.storage import StorageError, StorageFull


class ServingError(Exception):
    """A request that cannot be answered, with the status code the client should see.

    Subclasses fix the code; the message is sent to the client as the status details, so
    it names the field, the value and what is allowed, and never holds a secret.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    """A request field is malformed or out of range (the message names field and range)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    """The request names a song the index does not hold."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServingError):
    """The server is not in a state to answer: no model loaded, no data directory, a bundle
    that fails to load."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServingError):
    """Past a configured limit (concurrent RPCs, index capacity)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ServingError):
    """No bearer token where one is required."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServingError):
    """A bearer token that does not grant the call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(ServingError):
    """The caller's deadline passed before the work could start."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServingError):
    """The server is shutting down or its storage failed; retrying elsewhere may work."""

    code = grpc.StatusCode.UNAVAILABLE


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a client sees for ``exc``.

    Domain errors carry their own code; a bundle that fails to load is a failed
    precondition (the old model keeps serving); a durable write that failed is
    ``RESOURCE_EXHAUSTED`` when the disk is full, ``UNAVAILABLE`` otherwise (nothing of it
    was kept: retrying later is safe). Anything else is a server bug: ``INTERNAL`` with a
    generic message, while the traceback goes to the log only.
    """
    if isinstance(exc, ServingError):
        return exc.code, str(exc)
    if isinstance(exc, BundleError):
        return grpc.StatusCode.FAILED_PRECONDITION, f"bundle refused: {exc}"
    if isinstance(exc, StorageError):
        code = (grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, StorageFull)
                else grpc.StatusCode.UNAVAILABLE)
        return code, f"not stored: {exc}"
    return grpc.StatusCode.INTERNAL, "internal server error (logged on the server)"

"""The asyncio server interceptor in front of every songrec RPC: load shedding, bearer-token
checks, the mapping of errors to status codes, metrics and access logs."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from server.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ServingError,
    Unauthenticated,
    status_for,
)
from server.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/songrec.v1."
ADMIN_PREFIX = "/songrec.v1.Admin/"
DEADLINE_SLACK_S = 0.05

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens. Admin RPCs need ``admin`` (refused when it is None); inference RPCs
    need ``inference`` or ``admin`` when ``inference`` is set, nothing otherwise."""

    admin: str | None = field(default=None, repr=False)
    inference: str | None = field(default=None, repr=False)


def bearer(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, None when there is none.

    Raises :class:`Unauthenticated` for an authorization header of another form.
    """
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization: expected 'Bearer <token>'")
        return token.strip()
    return None


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def authorize(method: str, metadata: Any, tokens: Tokens) -> None:
    """Raise :class:`Unauthenticated` / :class:`PermissionDenied` unless the call's token
    grants ``method``. Never puts a token in a message."""
    admin = method.startswith(ADMIN_PREFIX)
    if admin and tokens.admin is None:
        raise PermissionDenied("admin RPCs are disabled: the server has no admin token "
                               "(set SONGREC_ADMIN_TOKEN or --admin-token-file)")
    if not admin and tokens.inference is None:
        return
    given = bearer(metadata)
    if given is None:
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
    if tokens.admin is not None and _same(given, tokens.admin):
        return
    if not admin and tokens.inference is not None and _same(given, tokens.inference):
        return
    raise PermissionDenied("the bearer token does not grant "
                           + ("admin RPCs" if admin else "this RPC"))


class Gate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps each unary songrec RPC: shed load past ``limit`` concurrent calls, check the
    token, run, map any error to its status code (``status_for``, the one mapping), record
    metrics. Health checks and reflection pass through untouched (probes must never be
    shed or need a token)."""

    def __init__(self, metrics: Metrics, limit: int, tokens: Tokens,
                 max_response_bytes: int | None = None) -> None:
        self.metrics = metrics
        self.limit = limit
        self.tokens = tokens
        self.max_response_bytes = max_response_bytes
        self.in_flight = 0
        self._wrapped: dict[str, Any] = {}

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: Any) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None:
            return handler
        if not method.startswith(SERVICE_PREFIX) or handler.unary_unary is None:
            wrapped = self._wrapped.get(method)
            if wrapped is None:
                wrapped = self._wrapped[method] = parsing(method, handler)
            return wrapped
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            # The request arrives as bytes and is parsed inside the guard: a payload that
            # is not a valid message then gets INVALID_ARGUMENT (gRPC's own deserializer
            # answers UNKNOWN), and only after the load and token checks.
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._guard(method, handler.unary_unary, handler.request_deserializer),
                request_deserializer=None,
                response_serializer=_serialize)
            self._wrapped[method] = wrapped
        return wrapped

    def _guard(self, method: str, behaviour: Behaviour,
               deserialize: Callable[[bytes], Any] | None = None) -> Behaviour:
        name = method.rsplit("/", 1)[-1]

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            admitted = False
            try:
                if self.in_flight >= self.limit:
                    raise ResourceExhausted(f"server busy: {self.in_flight} calls in flight "
                                            f"(limit {self.limit}); retry with backoff")
                self.in_flight += 1
                admitted = True
                self.metrics.in_flight.inc()
                authorize(method, context.invocation_metadata(), self.tokens)
                if deserialize is not None:
                    request = parse_request(name, request, deserialize)
                response = await behaviour(request, context)
                limit = self.max_response_bytes
                size = response.ByteSize() if limit is not None else 0
                if limit is not None and size > limit:
                    # gRPC would fail the call itself after we return, with a status our
                    # metrics never see: refuse it here, saying what to change.
                    raise ResourceExhausted(
                        f"the answer is {size} bytes, over this server's "
                        f"{limit}-byte message limit (--max-message-bytes); ask for fewer "
                        f"songs, neighbours or names per call")
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    # Finished after the deadline: the client has its DEADLINE_EXCEEDED
                    # already and gRPC drops this response.
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                return response
            except asyncio.CancelledError:
                # The client went away or its deadline passed; gRPC has already answered.
                # The client's own timer usually fires (and cancels the stream) a moment
                # before the server's copy of the deadline: allow for that.
                remaining = context.time_remaining()
                code = (grpc.StatusCode.DEADLINE_EXCEEDED
                        if remaining is not None and remaining < DEADLINE_SLACK_S
                        else grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:
                if _is_abort(exc):  # the behaviour aborted on its own: keep its status
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                code, message = status_for(exc)
                if not isinstance(exc, ServingError) and code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", name)
                await context.abort(code, message)
                raise  # abort() raises; this keeps type checkers content
            finally:
                seconds = time.perf_counter() - start
                self.metrics.observe(name, code.name, seconds)
                log.debug("rpc %s %s %.2fms", name, code.name, seconds * 1000)
                if admitted:
                    self.in_flight -= 1
                    self.metrics.in_flight.dec()

        return guarded


def parsing(method: str, handler: Any) -> Any:
    """``handler`` (health, reflection: no shedding, no token) with its requests parsed here:
    bytes that are no message get ``INVALID_ARGUMENT`` instead of gRPC's ``UNKNOWN`` and a
    logged traceback."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler
    name = method.rsplit("/", 1)[-1]

    async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse_request(name, raw, deserialize)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def each(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async for raw in requests:
            yield await parse(raw, context)

    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await unary(await parse(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)
    if handler.unary_stream is not None:
        stream = handler.unary_stream

        async def yielding(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            async for response in stream(await parse(raw, context), context):
                yield response

        async def writing(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await stream(await parse(raw, context), context)  # with context.write

        return grpc.unary_stream_rpc_method_handler(
            yielding if inspect.isasyncgenfunction(stream) else writing,
            response_serializer=serialize)
    if handler.stream_stream is not None:
        streams = handler.stream_stream

        async def yielding_all(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in streams(each(requests, context), context):
                yield response

        async def writing_all(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await streams(each(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(
            yielding_all if inspect.isasyncgenfunction(streams) else writing_all,
            response_serializer=serialize)
    streamed = handler.stream_unary

    async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await streamed(each(requests, context), context)

    return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serialize)


def _serialize(response: Any) -> bytes:
    """A response message, or one already in wire format (``server.wire.WireMessage``)."""
    data: bytes = response.SerializeToString()
    return data


def parse_request(name: str, raw: bytes, deserialize: Callable[[bytes], Any]) -> Any:
    """The request message of RPC ``name`` from its wire bytes.

    Raises :class:`InvalidArgument` when the bytes are not a valid message (a corrupt wire
    format, a string field that is not UTF-8).
    """
    try:
        return deserialize(raw)
    except Exception as exc:  # upb raises DecodeError; any failure here is the payload's
        raise InvalidArgument(f"request: not a valid {name} request message ({exc})") \
            from None


def _is_abort(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AbortError)

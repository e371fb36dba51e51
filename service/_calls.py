"""The calls a serving process has open, their request ids and log context, kept by one wrapper around every handler.

:class:`CallObserver`, the server's outermost interceptor, wraps every method's handler (:func:`observed`), so it sees
every call on the server's port, refused or not. For each call it

- takes the client's request id (``x-request-id`` metadata: at most :data:`MAX_REQUEST_ID_CHARS` of letters, digits
  and ``._:-``; anything else is replaced by an id of the server's own) and echoes it in the call's trailing
  metadata, so a client reads the id its error or its stream ended with;
- enters the call in its process's :class:`CallTable` (what ListStreams and ``patchwire top`` show), where the serving
  code adds what it delivers (:meth:`Call.served`, :func:`posted`): plain counters on the call's object, touched on
  the event loop only, so nothing on the hot path takes a lock;
- sets the call as the current one (a context variable of the call's task): every log record made on that task
  carries its request id, method, peer and identity (``patchwire --log-format json`` writes them);
- times a streaming call's messages: *work* from resuming the handler to its next message (reading, transforming,
  encoding), *wait* from handing that message to gRPC to being asked for the next one (gRPC's flow control: the client
  has not taken the previous ones yet). A stream that mostly waits is limited by its client or the network, one that
  mostly works by the server;
- counts the call's status code and duration (:mod:`patchwire.service._metrics`).

A server of several processes (``ServerConfig.run_dir``) publishes each process's table as a small JSON file under
``run_dir/"streams"`` once a second (:meth:`CallTable.publish`); ListStreams answers with its own process's calls and
every sibling's file (:meth:`CallTable.snapshot`). Executor threads do not see the current call (asyncio does not
carry context variables into ``run_in_executor``): what they log carries no request id.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc

from patchwire.service._auth import current_identity, wrap_behaviour
from patchwire.service._metrics import metrics, pattern_of
from patchwire.v1 import server_service_pb2 as spb

__all__ = [
    "MAX_REQUEST_ID_CHARS",
    "REQUEST_ID_KEY",
    "Call",
    "CallObserver",
    "CallTable",
    "current_call",
    "describe_call",
    "observed",
    "posted",
    "request_id_of",
]

_log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
"""The metadata key of a call's request id (sent by clients, echoed in the trailing metadata)."""
MAX_REQUEST_ID_CHARS = 64
"""Longest request id the server takes from a client (a UUID is 36 characters)."""
_SAFE_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}")
STALE_AFTER_S = 5.0
"""A table file not rewritten for this long belongs to a process that ended or hangs: ListStreams skips it."""


def new_request_id() -> str:
    """A fresh request id: 16 random hex digits."""
    return secrets.token_hex(8)


def request_id_of(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The client's request id from a call's invocation metadata when it is one the server may log and echo (bounded
    length, safe characters), else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            if _SAFE_ID.fullmatch(text):
                return text
            break
    return new_request_id()


@dataclass(eq=False, slots=True)
class Call:
    """One open call and what it has delivered so far (read by ListStreams)."""

    stream_id: str
    """Unique among the server's open calls: ``<worker index>.<number>``."""
    request_id: str
    method: str
    """The full method name, ``/patchwire.v1.DatasetService/StreamBatches``."""
    peer: str
    worker_index: int
    started_unix: float
    identity: str = ""
    """The caller's identity name, once the authentication gate has set it."""
    dataset: str = ""
    pattern: str = ""
    samples: int = 0
    """Samples delivered (dataset streams) or received (PostPredictions)."""
    bytes: int = 0
    wait_seconds: float = 0.0
    work_seconds: float = 0.0
    _counters: tuple[Any, Any] | None = field(default=None, repr=False)

    def describe(self, dataset: str, pattern: str) -> None:
        """Names what the call serves (on the call's own task: its identity is known there)."""
        self.dataset, self.pattern = dataset, pattern
        self.identity = current_identity().name
        m = metrics()
        self._counters = (
            m.served_samples.labels(dataset, self.identity, pattern),
            m.served_bytes.labels(dataset, self.identity, pattern),
        )

    def served(self, samples: int, nbytes: int) -> None:
        """Counts ``samples`` of ``nbytes`` sent (one message and its chunks); on the event loop."""
        self.samples += samples
        self.bytes += nbytes
        if self._counters is not None:
            self._counters[0].inc(samples)
            self._counters[1].inc(nbytes)

    def info(self) -> dict[str, Any]:
        """The fields of a ``StreamInfo`` message."""
        return {name: getattr(self, name) for name in _INFO_FIELDS}


_INFO_FIELDS = tuple(f.name for f in fields(Call) if not f.name.startswith("_"))

_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("patchwire_call", default=None)


def current_call() -> Call | None:
    """The call being served on this task (None outside a call, and on executor threads)."""
    return _current.get()


def describe_call(spec: Any, dataset: str | None = None, pattern: str | None = None) -> Call | None:
    """Names the dataset and pattern of the current call from its DatasourceSpec (or as given); returns the call
    (None outside an observed call: a servicer used on its own)."""
    call = _current.get()
    if call is not None:
        call.describe(dataset if dataset is not None else spec.dataset, pattern or pattern_of(spec))
    return call


def posted(samples: int, arrays: Mapping[str, Sequence[Any]]) -> None:
    """Counts a prediction batch the current call received (PostPredictions): ``arrays`` entry -> arrays."""
    nbytes = sum(int(a.nbytes) for values in arrays.values() for a in values)
    identity = current_identity().name
    m = metrics()
    m.posted_samples.labels(identity).inc(samples)
    m.posted_bytes.labels(identity).inc(nbytes)
    call = _current.get()
    if call is not None:
        call.samples += samples
        call.bytes += nbytes


class CallTable:
    """The open calls of one serving process; touched on its event loop only. ``run_dir``: where a server of several
    processes publishes each one's table (None: one process)."""

    def __init__(self, worker_index: int = 0, run_dir: Path | None = None) -> None:
        self.worker_index = worker_index
        self.run_dir = run_dir
        self._open: dict[str, Call] = {}
        self._numbered = 0

    def open(self, method: str, context: Any) -> Call:
        """A new call, listed until :meth:`close`; its request id is echoed in the trailing metadata."""
        call = self.call(method, context)
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        self._open[call.stream_id] = call
        return call

    def call(self, method: str, context: Any) -> Call:
        """A new call, not listed."""
        self._numbered += 1
        return Call(
            stream_id=f"{self.worker_index}.{self._numbered}",
            request_id=request_id_of(context.invocation_metadata()),
            method=method,
            peer=context.peer() or "",
            worker_index=self.worker_index,
            started_unix=time.time(),
        )

    def close(self, call: Call) -> None:
        self._open.pop(call.stream_id, None)

    def calls(self) -> list[Call]:
        """This process's open calls."""
        return list(self._open.values())

    def _streams_dir(self) -> Path | None:
        return None if self.run_dir is None else Path(self.run_dir) / "streams"

    def publish(self) -> None:
        """Writes this process's table to ``run_dir/"streams"/<pid>.json`` (replaced whole, never seen half
        written); nothing without a run_dir."""
        folder = self._streams_dir()
        if folder is None:
            return
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / f"{os.getpid()}.json"
        part = path.with_suffix(".part")
        part.write_text(json.dumps({"worker_index": self.worker_index, "streams": [c.info() for c in self.calls()]}))
        os.replace(part, path)

    def snapshot(self, exclude: Call | None = None) -> list[spb.StreamInfo]:
        """Every open call of the server: this process's as they are now, its siblings' as last published (files of
        processes that stopped publishing are skipped); ``exclude``: a call to leave out (the one asking)."""
        out = [spb.StreamInfo(**c.info()) for c in self.calls() if c is not exclude]
        folder = self._streams_dir()
        if folder is None or not folder.is_dir():
            return out
        now = time.time()
        for path in sorted(folder.glob("*.json")):
            if path.stem == str(os.getpid()):
                continue
            try:
                if now - path.stat().st_mtime > STALE_AFTER_S:
                    continue
                table = json.loads(path.read_text())
                out.extend(spb.StreamInfo(**info) for info in table["streams"])
            except (OSError, ValueError, KeyError, TypeError) as exc:  # a process gone meanwhile, or a foreign file
                _log.debug("streams: skipped %s: %s", path.name, exc)
        return out


def _code(context: Any) -> str:
    try:
        code = context.code()
    except Exception:  # a context without it (a test double)
        return "UNKNOWN"
    return "OK" if code is None else code.name


def _yields(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` (or the function it wraps) is an async generator: a streaming handler that yields its
    responses, rather than one that writes them with ``context.write`` (gRPC's health Watch)."""
    return inspect.isasyncgenfunction(handler) or inspect.isasyncgenfunction(inspect.unwrap(handler))


def observed(handler: Callable[..., Any], method: str, table: CallTable, streaming: bool) -> Callable[..., Any]:
    """``handler`` (taking ``(request, context)``; ``streaming``: it sends a stream of responses) kept in ``table``
    while it runs, with its request id, log context, timing and status counted (see the module docstring). A stream
    written with ``context.write`` instead of yielded is timed as a whole."""
    name = method.rsplit("/", 1)[-1]
    m = metrics()
    handled: dict[str, Any] = {}  # status code -> its counter (made on first use: series only for codes seen)
    duration = m.rpc_duration.labels(name)

    def ended(call: Call, code: str, begin: float) -> None:
        elapsed = time.perf_counter() - begin
        table.close(call)
        counter = handled.get(code)
        if counter is None:
            counter = handled[code] = m.rpc_handled.labels(name, code)
        counter.inc()
        duration.observe(elapsed)
        _current.set(call)  # (a cancelled stream ends on a finalizer's task: its lines still name the call)
        _log.debug("%s %s in %.3f s (%d samples, %d bytes)", name, code, elapsed, call.samples, call.bytes)

    open_streams = m.open_streams.labels(name) if streaming else None
    if streaming and _yields(handler):
        wait_seconds, work_seconds = m.stream_wait.labels(name), m.stream_work.labels(name)

        @functools.wraps(handler)
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            call = table.open(method, context)
            _current.set(call)  # the call's own task and context: nothing to reset
            assert open_streams is not None
            open_streams.inc()
            begin = mark = time.perf_counter()
            code = "UNKNOWN"
            try:
                async for item in handler(request, context):
                    now = time.perf_counter()
                    call.work_seconds += now - mark
                    if not call.identity:
                        call.identity = current_identity().name
                    yield item
                    mark = time.perf_counter()
                    call.wait_seconds += mark - now
                code = _code(context)
            except grpc.aio.AbortError:
                code = _code(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):  # the client went away (or the server is stopping)
                code = "CANCELLED"
                raise
            finally:
                assert open_streams is not None
                open_streams.dec()
                wait_seconds.inc(call.wait_seconds)
                work_seconds.inc(call.work_seconds)
                ended(call, code, begin)

        return stream

    @functools.wraps(handler)
    async def unary(request: Any, context: Any) -> Any:
        call = table.open(method, context)
        _current.set(call)
        if open_streams is not None:
            open_streams.inc()
        begin = time.perf_counter()
        code = "UNKNOWN"
        try:
            result = await handler(request, context)
            code = _code(context)
            return result
        except grpc.aio.AbortError:
            code = _code(context)
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            if open_streams is not None:
                open_streams.dec()
            call.work_seconds = time.perf_counter() - begin
            if not call.identity:
                call.identity = current_identity().name
            ended(call, code, begin)

    return unary


def relayed(handler: Callable[..., Any], method: str, table: CallTable, streaming: bool) -> Callable[..., Any]:
    """``handler`` on the home process's internal server, whose calls another process of the server forwards after
    observing them itself: the call is current (what it serves is counted in the metrics, its log lines carry the
    request id the client sent) but neither listed nor counted again."""
    if streaming:

        @functools.wraps(handler)
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            _current.set(table.call(method, context))
            async for item in handler(request, context):
                yield item

        return stream

    @functools.wraps(handler)
    async def unary(request: Any, context: Any) -> Any:
        _current.set(table.call(method, context))
        return await handler(request, context)

    return unary


class CallObserver(grpc.aio.ServerInterceptor):
    """The server interceptor that wraps every call's handler with :func:`observed` (listed first: outermost, so
    refusals by the other interceptors and gates are observed too); with ``forwarded``, on the home's internal server
    of calls other processes forward, with :func:`relayed`."""

    def __init__(self, table: CallTable, forwarded: bool = False) -> None:
        self._table = table
        self._wrap = relayed if forwarded else observed
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = wrap_behaviour(
            handler, lambda behaviour: self._wrap(behaviour, method, self._table, handler.response_streaming)
        )
        if len(self._wrapped) < 1024:  # (the server's methods; a bound whatever a generic handler answers to)
            self._wrapped[method] = (handler, wrapped)
        return wrapped


# -- log records carry the current call ------------------------------------------------------------------------------

CALL_FIELDS = ("request_id", "method", "identity", "peer")
"""Attributes a log record made inside a call gets (read by ``patchwire --log-format json``)."""


def _install_log_context() -> None:
    """Wraps the logging module's record factory (once per process) so that a record made on a call's task gets the
    call's :data:`CALL_FIELDS`."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "patchwire_calls", False):
        return

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        rec = previous(*args, **kwargs)
        call = _current.get()
        if call is not None:
            rec.request_id = call.request_id
            rec.method = call.method
            rec.identity = call.identity or current_identity().name
            rec.peer = call.peer
        return rec

    record.patchwire_calls = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(record)


_install_log_context()

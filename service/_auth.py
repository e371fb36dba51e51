"""Who is calling: identities with roles, and the identity of the call being served.

An identity is a name with roles: ``read`` (datasets), ``write`` (assembly jobs of its own) and ``admin`` (every
job). A server without authentication configured serves every caller as :data:`ANONYMOUS`, which holds every role;
jobs it makes belong to that name.

The identity of the call being served is set before its handler runs and read with :func:`current_identity` on the
handler's own task (executor threads do not see it: handlers pass it on explicitly).

With authentication configured (an :class:`Authenticator`, usually loaded from a TOML file by
:func:`load_auth_config`), every call of DatasetService and AssemblyService passes one gate, :func:`guarded`,
before its handler: the caller is identified by an ``authorization: Bearer <token>`` header, else by the subject of
its TLS client certificate; no or unknown credentials are UNAUTHENTICATED, a known identity without the method's
role (:data:`METHOD_ROLES`) is PERMISSION_DENIED. Health checks stay open; server reflection asks only for a known
identity (:class:`ReflectionGate`). The configuration file::

    [[identity]]
    name = "alice"                      # owner of the jobs alice creates, and her name in logs
    roles = ["read", "write"]           # read, write, admin
    token_sha256 = ["9f86d0..."]        # hex SHA-256 digests of her tokens (or token = ["plain"], discouraged)
    subjects = ["CN=alice"]             # TLS client certificate subjects ("CN=name" matches the common name)
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import hmac
import inspect
import logging
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool

from patchwire.service._errors import PermissionDenied, ServiceError, Unauthenticated, bounded

if TYPE_CHECKING:  # _limits imports this module
    from patchwire.service._limits import CallLimiter

__all__ = [
    "ADMIN",
    "ANONYMOUS",
    "HANDLER_OF_SHAPE",
    "METHOD_ROLES",
    "READ",
    "ROLES",
    "WRITE",
    "AuthConfigError",
    "Authenticator",
    "Identity",
    "ReflectionGate",
    "current_identity",
    "gated_handlers",
    "guarded",
    "load_auth_config",
    "parse_auth_config",
    "required_role",
    "serving_as",
    "token_digest",
    "wrap_behaviour",
]

READ = "read"
"""List, describe and stream datasets."""
WRITE = "write"
"""Create assembly jobs, and post to, read, abort and delete the jobs one created."""
ADMIN = "admin"
"""Everything: every job, whoever created it."""
ROLES = (READ, WRITE, ADMIN)


@dataclass(frozen=True)
class Identity:
    """A caller the server knows."""

    name: str
    """How the server names the caller: in logs, and as the owner of the jobs it creates."""
    roles: frozenset[str]
    """A subset of :data:`ROLES`."""

    def has(self, role: str) -> bool:
        return role in self.roles or ADMIN in self.roles

    def owns(self, owner: str | None) -> bool:
        """Whether this identity may act on what ``owner`` made (its own, or anything for an administrator; what has
        no owner, e.g. a job recovered from a state folder older than ownership, belongs to administrators only)."""
        return owner == self.name or ADMIN in self.roles


ANONYMOUS = Identity("anonymous", frozenset(ROLES))
"""Every caller of a server without authentication."""

_current: contextvars.ContextVar[Identity] = contextvars.ContextVar("patchwire_identity", default=ANONYMOUS)


def current_identity() -> Identity:
    """The identity of the call being served (ANONYMOUS outside a call or without authentication)."""
    return _current.get()


def serving_as(identity: Identity) -> contextvars.Token[Identity]:
    """Sets the identity of the call being served (on the call's task); returns the token to reset it."""
    return _current.set(identity)


_log = logging.getLogger(__name__)

_DATASET = "/patchwire.v1.DatasetService/"
_ASSEMBLY = "/patchwire.v1.AssemblyService/"
_SERVER = "/patchwire.v1.ServerService/"
METHOD_ROLES: Mapping[str, str | None] = {
    **{
        _DATASET + m: READ
        for m in (
            "ListDatasets",
            "DescribeDataset",
            "OpenDatasource",
            "GetSamples",
            "DirectExtract",
            "StreamBatches",
            "SelectIndices",
        )
    },
    **{
        _ASSEMBLY + m: WRITE
        for m in (
            "CreateJob",
            "PostPredictions",
            "SubscribeEvents",
            "GetJobStatus",
            "ListJobs",
            "FetchSubject",
            "ReleaseSharedFiles",
            "ExportSubject",
            "AbortJob",
            "DeleteJob",
        )
    },
    # a region is used only by calls that need their own role (reading samples, posting, fetching subjects)
    _ASSEMBLY + "RegisterSharedMemory": None,
    # which replica answers is what every client needs to route assembly jobs; who else is calling is an operator's
    _SERVER + "GetServerInfo": None,
    _SERVER + "ListStreams": ADMIN,
}
"""The role each method needs (None: any known identity). Assembly methods need ``write``; which jobs a caller may
touch is then decided by ownership (:meth:`Identity.owns`)."""


def required_role(method: str) -> str | None:
    """The role ``method`` (``/package.Service/Method``) needs (None: any known identity); a method missing from the
    table needs ``admin`` (a new method is closed until it is listed)."""
    return METHOD_ROLES.get(method, ADMIN)


def token_digest(token: str | bytes) -> bytes:
    """The SHA-256 digest under which a bearer token is stored and compared."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class AuthConfigError(ValueError):
    """An authentication configuration that cannot be used (the message names the offending key)."""


@dataclass(frozen=True)
class Authenticator:
    """Who may call: identities by the SHA-256 digest of their bearer tokens and by their certificate subjects."""

    tokens: Sequence[tuple[bytes, Identity]] = ()
    """(SHA-256 digest of a token, identity it stands for)."""
    subjects: Mapping[str, Identity] = field(default_factory=dict)
    """TLS client certificate subject (as gRPC reports it, e.g. ``CN=alice,O=lab``, or ``CN=alice`` to match the
    common name alone) -> identity."""

    def identify_token(self, token: str) -> Identity | None:
        digest = token_digest(token)
        found = None
        for known, identity in self.tokens:  # every digest is compared, each in constant time
            if hmac.compare_digest(known, digest):
                found = identity
        return found

    def identify_certificate(self, auth_context: Mapping[str, Iterable[bytes]]) -> Identity | None:
        for subject in auth_context.get("x509_subject", ()):
            identity = self.subjects.get(subject.decode(errors="replace"))
            if identity is not None:
                return identity
        for name in auth_context.get("x509_common_name", ()):
            identity = self.subjects.get("CN=" + name.decode(errors="replace"))
            if identity is not None:
                return identity
        return None

    def authenticate(
        self, metadata: Iterable[tuple[str, Any]], auth_context: Mapping[str, Iterable[bytes]]
    ) -> Identity:
        """The caller's identity: its bearer token if it sent one, else its certificate subject.

        Raises Unauthenticated for no credentials, a malformed header, or credentials nobody is configured with
        (a token that is sent and unknown is refused even if the certificate would be known)."""
        for key, value in metadata:
            if key != "authorization":
                continue
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization: expected 'Bearer <token>'")
            identity = self.identify_token(token.strip())
            if identity is None:
                raise Unauthenticated("authorization: unknown token")
            return identity
        identity = self.identify_certificate(auth_context)
        if identity is not None:
            return identity
        if auth_context.get("x509_subject") or auth_context.get("x509_common_name"):
            raise Unauthenticated("the client certificate is not mapped to any identity on this server")
        raise Unauthenticated("credentials required: send 'authorization: Bearer <token>' or a client certificate")

    def authorize(self, context: Any, method: str, role: str | None) -> Identity:
        """Identifies the caller of ``context`` and checks ``role`` (None: any known identity)."""
        identity = self.authenticate(context.invocation_metadata() or (), context.auth_context() or {})
        if role is not None and not identity.has(role):
            raise PermissionDenied(f"{identity.name!r} lacks the {role!r} role that {method} needs")
        return identity


def parse_auth_config(data: Mapping[str, Any]) -> Authenticator:
    """An Authenticator from a parsed configuration (see the module docstring for the layout)."""
    entries = data.get("identity")
    unknown = set(data) - {"identity"}
    if unknown:
        raise AuthConfigError(f"unknown keys {sorted(unknown)}: the file holds [[identity]] tables")
    if not isinstance(entries, list) or not entries:
        raise AuthConfigError("identity: give at least one [[identity]] table")
    tokens: list[tuple[bytes, Identity]] = []
    subjects: dict[str, Identity] = {}
    names: set[str] = set()
    for k, entry in enumerate(entries):
        where = f"identity[{k}]"
        if not isinstance(entry, dict):
            raise AuthConfigError(f"{where}: expected a table")
        extra = set(entry) - {"name", "roles", "token_sha256", "token", "subjects"}
        if extra:
            raise AuthConfigError(f"{where}: unknown keys {sorted(extra)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name or name == ANONYMOUS.name:
            raise AuthConfigError(f"{where}.name: a non-empty name other than {ANONYMOUS.name!r} is required")
        if name in names:
            raise AuthConfigError(f"{where}.name: {name!r} is given twice")
        names.add(name)
        roles = entry.get("roles")
        if not isinstance(roles, list) or not roles or not all(r in ROLES for r in roles):
            raise AuthConfigError(f"{where}.roles: a non-empty list of {', '.join(ROLES)}")
        identity = Identity(name, frozenset(roles))
        for digest in _strings(entry, "token_sha256", where):
            try:
                raw = bytes.fromhex(digest)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise AuthConfigError(f"{where}.token_sha256: 64 hex digits expected")
            tokens.append((raw, identity))
        for plain in _strings(entry, "token", where):
            if len(plain) < 16:
                raise AuthConfigError(f"{where}.token: at least 16 characters")
            tokens.append((token_digest(plain), identity))
        for subject in _strings(entry, "subjects", where):
            if subject in subjects:
                raise AuthConfigError(f"{where}.subjects: {subject!r} already belongs to {subjects[subject].name!r}")
            subjects[subject] = identity
        if not any(entry.get(key) for key in ("token_sha256", "token", "subjects")):
            raise AuthConfigError(f"{where}: give token_sha256, token or subjects: nobody could be {name!r}")
    digests = [d for d, _ in tokens]
    if len(set(digests)) != len(digests):
        raise AuthConfigError("a token is given to more than one identity (or twice)")
    return Authenticator(tuple(tokens), subjects)


def _strings(entry: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = entry.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AuthConfigError(f"{where}.{key}: a string or a list of non-empty strings")
    return value


def load_auth_config(path: Path, read: Callable[[Path], bytes] = Path.read_bytes) -> Authenticator:
    """An Authenticator from the TOML file at ``path`` (``read`` is injectable for tests)."""
    try:
        data = tomllib.loads(read(path).decode())
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AuthConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_auth_config(data)
    except AuthConfigError as exc:
        raise AuthConfigError(f"{path}: {exc}") from None


async def _refuse(context: Any, exc: ServiceError, method: str) -> None:
    _log.warning("%s: %s: %s (peer %s)", method, exc.code.name, exc, bounded(context.peer()))
    await context.abort(exc.code, str(exc))


def guarded(
    behaviour: Callable[..., Any], method: str, authenticator: Authenticator | None, role: str | None = ""
) -> Callable[..., Any]:
    """``behaviour`` (a handler taking ``(request, context)``) behind the gate: the caller is identified and
    checked for ``role`` (default: :func:`required_role` of ``method``; None: any known identity) and the handler
    runs with :func:`current_identity` set to it. Without an authenticator the handler is returned as it is (every
    caller is ANONYMOUS)."""
    if authenticator is None:
        return behaviour
    need = required_role(method) if role == "" else role

    if inspect.isasyncgenfunction(behaviour) or inspect.isasyncgenfunction(getattr(behaviour, "__wrapped__", None)):

        @functools.wraps(behaviour)
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                identity = authenticator.authorize(context, method, need)
            except (Unauthenticated, PermissionDenied) as exc:
                await _refuse(context, exc, method)
                return
            serving_as(identity)  # the call's own task and context: nothing to reset
            async for item in behaviour(request, context):
                yield item

        return stream

    @functools.wraps(behaviour)
    async def unary(request: Any, context: Any) -> Any:
        try:
            identity = authenticator.authorize(context, method, need)
        except (Unauthenticated, PermissionDenied) as exc:
            await _refuse(context, exc, method)
            return None
        serving_as(identity)
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result

    return unary


HANDLER_OF_SHAPE: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
"""gRPC's handler factory for a call shape: (client streaming, server streaming)."""


def gated_handlers(
    service_name: str,
    behaviour_of: Callable[[Any], Callable[..., Any]],
    authenticator: Authenticator | None,
    limiter: CallLimiter | None,
    response_serializer: Callable[[Any], bytes],
) -> grpc.GenericRpcHandler:
    """Every method of ``service_name`` (a service of the default descriptor pool) as a gRPC handler of its call
    shape whose requests arrive as wire bytes: ``behaviour_of(method descriptor)``, with ``limiter`` behind the
    limits on concurrent calls, and before those :func:`guarded` by ``authenticator``, so the limits count by the
    identity the gate set."""
    service = descriptor_pool.Default().FindServiceByName(service_name)
    handlers = {}
    for m in service.methods:
        behaviour = behaviour_of(m)
        limited = behaviour if limiter is None else limiter.guard(behaviour)
        handlers[m.name] = HANDLER_OF_SHAPE[(m.client_streaming, m.server_streaming)](
            guarded(limited, f"/{service_name}/{m.name}", authenticator),
            request_deserializer=_identity,
            response_serializer=response_serializer,
        )
    return grpc.method_handlers_generic_handler(service_name, handlers)


def _identity(data: bytes) -> bytes:
    return data


def wrap_behaviour(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour (the one of its four call-shape fields that is set) replaced by
    ``wrap(behaviour)``: how a server interceptor puts code around a call it did not write."""
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
    return handler._replace(**{kind: wrap(getattr(handler, kind))})


class ReflectionGate(grpc.aio.ServerInterceptor):
    """Server reflection only for a known identity (any role) when authentication is on; other services pass."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/grpc.reflection."):
            return handler
        return wrap_behaviour(handler, lambda behaviour: guarded(behaviour, method, self._authenticator, None))

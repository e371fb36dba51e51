"""Several replicas behind one client: where calls go, and which replica is an assembly job's home.

``connect`` takes one server (``"host:port"``), a list of replicas (``["a:50051", "b:50051"]`` or ``"a:50051,
b:50051"``) or a DNS name (``"dns:///patchwire.ns.svc.cluster.local:50051"``, a Kubernetes headless Service: one
address per ready pod). With several, dataset calls go over one channel with gRPC's own ``round_robin`` load
balancing (:class:`Target`): every call, a stream included, goes to the next replica that is READY, so consumers
spread over the replicas, and a stream whose replica dies is opened again at its cursor on another (an epoch's
order depends on (seed, epoch) alone: any replica serves any shard). For a DNS name gRPC's resolver re-resolves
when a connection drops (at most once a second here): a restarted pod at a new address joins again.

Assembly jobs keep their state on one replica, their home (:mod:`patchwire.wire.replicas`): ``<replica_id>.<rest>``
names it; an id without a home in it is homed by rendezvous hashing (:func:`rendezvous`) of the id over the replica
ids this process has seen, so every client that sees the same replicas agrees without asking anyone. New jobs are
named by the client with the home chosen the same way over the replicas that answer (the id's random part is the
key), so jobs spread over the replicas. :class:`Replicas` finds which replica answers where: it resolves the target
(``socket.getaddrinfo`` for a DNS name) and asks every address's ``GetServerInfo``; :class:`HomeConnection` is a
direct channel (``pick_first``, same credentials) to one job's home, found again (re-resolved and asked again) after
a call to it failed as unreachable, so a home restarted elsewhere (same replica id, a new address) is followed.
While its home is away, a job's calls wait within the client's retry budget (:class:`~patchwire.client.RetryPolicy`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from patchwire.client._connection import Connection
from patchwire.client._errors import ServerUnavailable
from patchwire.v1 import server_service_pb2, server_service_pb2_grpc
from patchwire.wire.replicas import job_home, new_job_id

if TYPE_CHECKING:
    from patchwire.client._credentials import Credentials
    from patchwire.client._timeouts import Timeouts

__all__ = [
    "BALANCING_OPTIONS",
    "HomeConnection",
    "Replicas",
    "Survey",
    "Target",
    "home_replica",
    "parse_target",
    "rendezvous",
]

_log = logging.getLogger(__name__)

BALANCING_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
]
"""Channel options of a channel over several replicas: gRPC's ``round_robin`` (one connection per address, each call
to the next READY one), and DNS re-resolution at most once a second instead of every 30 s, so that a replica back at
a new address is used again soon after the old connection drops."""
SURVEY_TIMEOUT_S = 5.0
"""Most seconds a ``GetServerInfo`` to one address may take while finding the replicas (they are asked at once)."""
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def _split_host_port(address: str, where: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address); ValueError naming ``where``."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address without brackets: its port cannot be told apart
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{where}: expected HOST:PORT ([IPv6]:PORT) with a port from 1 to 65535, got {address!r}")
    return host, int(port_text)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


@dataclass(frozen=True)
class Target:
    """Where a client's calls go: one address, several replicas (``addresses``), or every address a DNS name resolves
    to (``dns_name`` and ``port``). Build it with :func:`parse_target`."""

    addresses: tuple[str, ...] = ()
    """``HOST:PORT`` of each replica as given (a single one for one server, passed to gRPC as it is)."""
    dns_name: str | None = None
    port: int = 0
    tls_name: str | None = None
    """The name the servers' certificates are checked against where gRPC cannot tell it from the address (an address
    resolved from a DNS name or a list): the DNS name, or the first replica's host. None: gRPC's own."""

    @property
    def replicated(self) -> bool:
        """Whether calls are spread over several replicas (a list, or a DNS name that may resolve to several)."""
        return self.dns_name is not None or len(self.addresses) > 1

    def __str__(self) -> str:
        if self.dns_name is not None:
            return f"dns:///{_join_host_port(self.dns_name, self.port)}"
        return ",".join(self.addresses)

    def resolve(self) -> list[str]:
        """The replicas' addresses now: a list's as given; a DNS name's from ``socket.getaddrinfo`` (IPv4 first).
        OSError where the name does not resolve."""
        if self.dns_name is None:
            return list(self.addresses)
        infos = socket.getaddrinfo(self.dns_name, self.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        hosts = sorted({str(info[4][0]) for info in infos}, key=lambda h: (_ip_version(h) != 4, h))
        return [_join_host_port(h, self.port) for h in hosts]

    def channel_target(self) -> str:
        """The target string gRPC's channel takes: the address itself, the ``dns:///`` name, or for a list the
        ``ipv4:``/``ipv6:`` form of its addresses (host names resolved now; IPv4 where both kinds are there)."""
        if not self.replicated:
            return self.addresses[0]
        if self.dns_name is not None:
            return str(self)
        resolved: dict[int, list[str]] = {4: [], 6: []}
        failures = []
        for address in self.addresses:
            host, port = _split_host_port(address, "address")
            version = _ip_version(host)
            if version is not None:
                resolved[version].append(_join_host_port(host, port))
                continue
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            except OSError as exc:
                failures.append(f"{address}: {exc}")
                continue
            for info in infos:
                ip = str(info[4][0])
                version = _ip_version(ip)
                if version is not None and _join_host_port(ip, port) not in resolved[version]:
                    resolved[version].append(_join_host_port(ip, port))
        version = 4 if resolved[4] else 6
        if not resolved[version]:
            raise ServerUnavailable(f"no address of {self} resolves ({'; '.join(failures)})")
        return f"ipv{version}:" + ",".join(resolved[version])

    def channel_options(self, secure: bool) -> list[tuple[str, Any]]:
        """Options for this target's channel: load balancing for several replicas, the certificate's name."""
        options: list[tuple[str, Any]] = list(BALANCING_OPTIONS) if self.replicated else []
        if secure and self.tls_name is not None:
            options.append(("grpc.ssl_target_name_override", self.tls_name))
        return options

    def replica(self, address: str) -> Target:
        """The target of one replica of this one at ``address`` (one of :meth:`resolve`'s), its certificate checked
        against the same name as the whole target's: the DNS name, or a list's first host."""
        return Target((address,), tls_name=self.dns_name if self.dns_name is not None else self.tls_name)


def parse_target(target: str | Sequence[str]) -> Target:
    """The :class:`Target` of what ``connect`` was given: ``"host:port"`` (passed to gRPC as it is), a list or tuple
    of ``"host:port"`` or one string of them separated by commas, or ``"dns:///name:port"``. ValueError saying
    what is wrong otherwise (an empty list, a replica given twice, a port missing from a replica or a DNS name)."""
    if isinstance(target, str):
        text = target.strip()
        if text.startswith("dns:"):
            rest = text[len("dns:") :]
            if not rest.startswith("///"):
                raise ValueError(
                    f"target: expected dns:///NAME:PORT (no DNS server named between // and /), got {target!r}"
                )
            name, port = _split_host_port(rest[3:], "target")
            if _ip_version(name) is not None:
                raise ValueError(f"target: dns:/// takes a name to resolve, not an address, got {target!r}")
            return Target(dns_name=name, port=port)
        if "," not in text:
            if not text:
                raise ValueError("target: empty; expected HOST:PORT, a list of them or dns:///NAME:PORT")
            return Target((text,))
        parts = [p.strip() for p in text.split(",")]
    else:
        parts = [str(p).strip() for p in target]
        if len(parts) == 1 and "," not in parts[0] and not parts[0].startswith("dns:"):
            return parse_target(parts[0])
    if not parts or not all(parts):
        raise ValueError(f"target: an empty replica address in {target!r}")
    for p in parts:
        if p.startswith("dns:") or "," in p:
            raise ValueError(f"target: a list holds HOST:PORT addresses only, got {p!r}")
        _split_host_port(p, "target")
    if len(set(parts)) < len(parts):
        raise ValueError(f"target: a replica is given twice in {target!r}")
    first_host, _ = _split_host_port(parts[0], "target")
    return Target(tuple(parts), tls_name=first_host if len(parts) > 1 else None)


def rendezvous(key: str, replica_ids: Iterable[str]) -> str:
    """The replica that ``key`` belongs to by rendezvous (highest random weight) hashing: each replica id weighs
    ``blake2b(replica_id, key)`` and the heaviest wins. Every client computes the same from the same ids, and when a
    replica joins or leaves only the keys it wins or won move. ValueError for no replicas."""
    ids = list(replica_ids)
    if not ids:
        raise ValueError("rendezvous: no replicas to choose from")

    def weight(replica_id: str) -> tuple[bytes, str]:
        digest = hashlib.blake2b(key.encode(), key=replica_id.encode()[:64], digest_size=16, person=b"patchwire-home")
        return digest.digest(), replica_id

    return max(ids, key=weight)


def home_replica(job_id: str, replica_ids: Iterable[str]) -> str:
    """The replica id of a job's home: the one its id names (``<replica_id>.<rest>``), else by rendezvous hashing
    of the id over ``replica_ids``."""
    return job_home(job_id) or rendezvous(job_id, replica_ids)


@dataclass(frozen=True)
class Survey:
    """Which replica answered at which address, and the addresses that did not (with the reason)."""

    answered: dict[str, str] = field(default_factory=dict)
    """Replica id -> address, in the order the target resolved them."""
    unanswered: dict[str, str] = field(default_factory=dict)
    """Address -> why it did not say which replica it is."""


class Replicas:
    """The replicas behind a replicated target, with the address each answered at: found by a :meth:`survey` and
    remembered by this process, so that a replica that is away keeps its place (its jobs wait for it instead of
    being looked for elsewhere). One per target and credentials per process (:meth:`of`)."""

    _directories: dict[tuple[str, Credentials], Replicas] = {}

    def __init__(self, target: Target, credentials: Credentials, timeouts: Timeouts) -> None:
        self.target = target
        self.credentials = credentials
        self.timeouts = timeouts
        self._known: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, target: Target, credentials: Credentials, timeouts: Timeouts) -> Replicas:
        """This process's directory of ``target``'s replicas (made on first use)."""
        return cls._directories.setdefault((str(target), credentials), cls(target, credentials, timeouts))

    @property
    def known(self) -> dict[str, str]:
        """Every replica id seen so far -> the address it last answered at."""
        return dict(self._known)

    def channel(self, address: str) -> grpc.Channel:
        """A direct channel (gRPC's default ``pick_first``) to one replica at ``address``, with this target's
        credentials and certificate name (the caller closes it)."""
        target = self.target.replica(address)
        return self.credentials.channel(target.channel_target(), target.channel_options(self.credentials.secure))

    def survey(self) -> Survey:
        """Resolves the target and asks every address which replica answers there (``GetServerInfo``, all at once,
        each within :data:`SURVEY_TIMEOUT_S`); what answered is remembered."""
        try:
            addresses = self.target.resolve()
        except OSError as exc:
            return Survey({}, {str(self.target): f"does not resolve: {exc}"})
        timeout = min(self.timeouts.unary_s, SURVEY_TIMEOUT_S)
        channels = [self.channel(a) for a in addresses]
        try:
            pending = [
                server_service_pb2_grpc.ServerServiceStub(c).GetServerInfo.future(
                    server_service_pb2.GetServerInfoRequest(), timeout=timeout
                )
                for c in channels
            ]
            answered: dict[str, str] = {}
            unanswered: dict[str, str] = {}
            for address, future in zip(addresses, pending, strict=True):
                try:
                    replica_id = future.result().replica_id
                except grpc.RpcError as exc:
                    unanswered[address] = f"{exc.code().name}: {exc.details()}"
                    continue
                if not replica_id:
                    unanswered[address] = "the server did not say which replica it is"
                elif replica_id in answered:
                    unanswered[address] = f"replica {replica_id!r} answered at {answered[replica_id]} too"
                else:
                    answered[replica_id] = address
        finally:
            for c in channels:
                c.close()
        with self._lock:
            self._known.update(answered)
        if unanswered:
            reasons = "; ".join(f"{a} ({r})" for a, r in unanswered.items())
            _log.info("replicas of %s: no answer from %s", self.target, reasons)
        return Survey(answered, unanswered)

    def locate(self, replica_id: str, fresh: bool = False) -> str | None:
        """The address of replica ``replica_id``: the one remembered (unless ``fresh``), else where a survey finds it
        now, else where it last answered; None where it was never found."""
        if not fresh and replica_id in self._known:
            return self._known[replica_id]
        found = self.survey().answered.get(replica_id)
        return found if found is not None else self._known.get(replica_id)

    def replica_ids(self) -> list[str]:
        """Every replica id seen so far (a survey first where none was); ServerUnavailable where none answers."""
        if not self._known:
            survey = self.survey()
            if not survey.answered:
                raise ServerUnavailable(f"no replica answered at {self.target} ({_reasons(survey)})")
        return sorted(self._known)

    def home_of(self, job_id: str) -> str:
        """The replica id of the job's home (:func:`home_replica` over the replicas seen)."""
        home = job_home(job_id)
        return home if home is not None else rendezvous(job_id, self.replica_ids())

    def new_job_id(self) -> str:
        """A new job id whose home is a replica that answers now, chosen by rendezvous hashing of a random key (so
        new jobs spread evenly over the replicas); ServerUnavailable where none answers."""
        survey = self.survey()
        if not survey.answered:
            raise ServerUnavailable(f"no replica answered at {self.target} ({_reasons(survey)})")
        return new_job_id(rendezvous(os.urandom(8).hex(), survey.answered))


def _reasons(survey: Survey) -> str:
    return "; ".join(f"{a}: {r}" for a, r in survey.unanswered.items()) or "no address"


class _WatchUnreachable(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Calls ``unreachable()`` when a call ends UNAVAILABLE or DEADLINE_EXCEEDED."""

    def __init__(self, unreachable: Callable[[], None]) -> None:
        self._unreachable = unreachable

    def _watch(self, call: Any) -> Any:
        def done(c: Any) -> None:
            try:
                code = c.code()
            except Exception:  # (a call that never started has no code to read)
                return
            if code in _UNREACHABLE:
                self._unreachable()

        call.add_done_callback(done)
        return call

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._watch(continuation(details, request))

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._watch(continuation(details, request))

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return self._watch(continuation(details, requests))

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return self._watch(continuation(details, requests))


class HomeConnection(Connection):
    """A direct connection to the home replica of one assembly job (:meth:`place` names the job): it opens a channel
    to the address the home answers at, and after a call to it failed as unreachable (UNAVAILABLE, or a deadline),
    the next use looks for the home again (a fresh survey) and follows it to a new address. Until the home was ever
    found, using the connection raises ServerUnavailable, which the assembler's retries wait on like an unreachable
    server."""

    def __init__(self, replicas: Replicas, timeouts: Timeouts | None = None) -> None:
        super().__init__(replicas.target, replicas.credentials, timeouts or replicas.timeouts)
        self.replicas = replicas
        self.job_id: str | None = None
        self.home: str | None = None
        """The home's replica id (None until the job is placed and, for an id that does not name it, hashed)."""
        self._stale = False
        self.address = f"the home of no job yet at {replicas.target}"

    @property
    def replicated(self) -> bool:
        return False  # (one replica: its shared memory and leases are this connection's)

    def place(self, job_id: str) -> None:
        """Points this connection at the home of ``job_id`` (found on first use)."""
        if job_id != self.job_id:
            self.close()
            self.job_id, self.home = job_id, job_home(job_id)
            self.address = f"the home of assembly job {job_id!r} at {self.replicas.target}"

    def _ensure(self) -> None:
        if self._pid == os.getpid() and self._channel is not None and not self._stale:
            return
        if self.job_id is None:
            raise ServerUnavailable(f"{self.address}: the assembly job is not created yet")
        if self.home is None:  # (ServerUnavailable where no replica answers yet: retried like an unreachable server)
            self.home = self.replicas.home_of(self.job_id)
        stale, self._stale = self._stale, False
        address = self.replicas.locate(self.home, fresh=stale)
        if address is None:
            raise ServerUnavailable(
                f"no replica {self.home!r} answers at {self.replicas.target} (replicas seen: "
                f"{', '.join(sorted(self.replicas.known)) or 'none'})"
            )
        if address != self.address or self.target.addresses != (address,):
            if self._channel is not None:
                _log.info("assembly home %r answers at %s now (was %s)", self.home, address, self.address)
            self.close()
            self.address, self.target = address, self.replicas.target.replica(address)
        super()._ensure()

    def _new_channel(self, options: list[tuple[str, Any]]) -> grpc.Channel:
        this = weakref.ref(self)  # (the channel's calls must not keep the connection alive)

        def unreachable() -> None:
            connection = this()
            if connection is not None:
                connection._stale = True

        return grpc.intercept_channel(super()._new_channel(options), _WatchUnreachable(unreachable))

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled (into another process): a plain connection to where the home answers now
        return (Connection, (self.target, self.credentials, self.timeouts))

"""Which codec a client asks its server to compress tensors with: ``compression="auto"``, ``"none"`` or a codec.

``"auto"`` (the default) compresses where bytes are what a link lacks and leaves CPU alone where they are not:

- **off** for a target on this host: a loopback address (``127.0.0.0/8``, ``::1``, ``localhost``), a Unix socket, or
  one of this host's own addresses (the kernel carries those over loopback too). Measured on loopback (the README's
  "On a real link: compression"): compressing and decompressing cost more CPU than moving the bytes, whose copy
  runs at memory speed.
- **off** wherever same-host shared memory carries the payloads (``ds[i]`` / ``get_samples`` reading through a
  registered segment): nothing crosses a link.
- **on** otherwise, with the first codec of :data:`~patchwire.wire.compression.AUTO_PREFERENCE` that the server offers
  (``ServerService.GetServerInfo``, asked once per server address in each process); off where the server offers none
  or does not answer that call (an older server).

A codec named explicitly (``"shuffle-lz4"``, ``"shuffle-zstd"``, ``"lz4"``) is asked for whatever the target; a
server that does not offer it refuses the call with INVALID_ARGUMENT naming the codecs it offers (the client's
``InvalidArgumentError``).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from patchwire.v1 import server_service_pb2, server_service_pb2_grpc
from patchwire.wire import compression

if TYPE_CHECKING:
    from patchwire.client._connection import Connection

__all__ = ["AUTO", "CHOICES", "OFF", "check_option", "is_local_target", "resolve", "server_offers"]

AUTO = "auto"
OFF = "none"
CHOICES: tuple[str, ...] = (AUTO, OFF, *compression.SUPPORTED)
"""What ``compression=`` takes."""

_offers: dict[str, tuple[int, ...]] = {}
_offers_lock = threading.Lock()


def check_option(value: str) -> str:
    """``value`` if it is one of :data:`CHOICES`, else ValueError naming them."""
    if value not in CHOICES:
        raise ValueError(f"compression must be one of {', '.join(repr(c) for c in CHOICES)}, got {value!r}")
    return value


def _hosts(target: str) -> list[str] | None:
    """The host names or addresses of a gRPC target (``host:port``, ``[v6]:port``, ``ipv4:a:p,b:p``,
    ``ipv6:[a]:p``, ``dns:///name:port``, comma-separated lists); None for a Unix socket (always this host)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return None
    scheme, sep, rest = target.partition(":")
    if sep and scheme in ("dns", "ipv4", "ipv6"):
        target = rest.split("/")[-1] if scheme == "dns" else rest
    hosts = []
    for address in target.split(","):
        address = address.strip()
        if address.startswith("["):  # [v6]:port
            hosts.append(address[1 : address.find("]")])
        elif address.count(":") > 1:  # a bare IPv6 address without a port
            hosts.append(address)
        else:
            hosts.append(address.rpartition(":")[0] if ":" in address else address)
    return hosts


def _local_address(address: str) -> bool:
    """Whether an IP address is this host's: loopback, unspecified (0.0.0.0 reaches this host), or one it can bind
    (an address of one of its interfaces)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def _local_host(host: str) -> bool:
    if host in ("localhost", "") or host.endswith(".localhost"):
        return True
    try:
        return _local_address(host)
    except ValueError:  # a name: local when every address it resolves to is
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(_local_address(str(info[4][0])) for info in infos)


def is_local_target(target: str | Sequence[str]) -> bool:
    """Whether every address of ``target`` (a gRPC target or a list of them) is on this host (see the module)."""
    targets = [target] if isinstance(target, str) else list(target)
    for t in targets:
        hosts = _hosts(t)
        if hosts is not None and not all(_local_host(h) for h in hosts):
            return False
    return True


def server_offers(connection: Connection) -> tuple[int, ...]:
    """The codecs the server at ``connection`` offers (asked once per address in this process; () where it does not
    say: an older server without ServerService, or one that does not answer the call now)."""
    key = str(connection.address)
    with _offers_lock:
        known = _offers.get(key)
    if known is not None:
        return known
    stub = server_service_pb2_grpc.ServerServiceStub(connection.channel)
    try:
        info = stub.GetServerInfo(server_service_pb2.GetServerInfoRequest(), timeout=connection.timeouts.unary_s)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server that never offers any: remembered
            with _offers_lock:
                _offers[key] = ()
        return ()
    offers = tuple(int(c) for c in info.compressions)
    with _offers_lock:
        _offers[key] = offers
    return offers


def resolve(option: str, connection: Connection) -> compression.Compression.ValueType:
    """The codec to ask for under ``option`` (:data:`CHOICES`) from the server at ``connection``: NONE, the named
    codec, or for ``"auto"`` what the module's rules pick."""
    if option == OFF:
        return compression.NONE
    if option != AUTO:
        return compression.codec_from_name(option)
    if is_local_target(connection.address):
        return compression.NONE
    offers = server_offers(connection)
    for name in compression.AUTO_PREFERENCE:
        if compression.NAMES[name] in offers:
            return compression.NAMES[name]
    return compression.NONE

"""Health probe of a patchwire server: exits 0 when ``grpc.health.v1.Health/Check`` answers SERVING, 1 otherwise.

The server image's ``HEALTHCHECK`` and the Kubernetes exec probes run it as ``python /opt/patchwire/healthcheck.py``.
It needs only grpcio and grpcio-health-checking (the ``server`` extra), starts in about a tenth of a second and is
configured by environment variables, so the same file serves Docker, compose and Kubernetes:

``PATCHWIRE_HEALTH_TARGET``
    HOST:PORT to probe (default ``127.0.0.1:50051``).
``PATCHWIRE_HEALTH_SERVICE``
    The health service name to check (default ``""``: the server as a whole; ``patchwire.v1.DatasetService`` or a
    dataset's own name are others the server reports).
``PATCHWIRE_HEALTH_CA``
    A CA certificate file: when that file exists the probe speaks TLS and trusts it. The variable may name a file
    that is absent (the image sets it to ``/run/secrets/ca.crt``): then the probe speaks plaintext, which is what a
    server started without TLS answers.
``PATCHWIRE_HEALTH_CERT``, ``PATCHWIRE_HEALTH_KEY``
    A client certificate and its key, for a server that requires mutual TLS.
``PATCHWIRE_HEALTH_SERVER_NAME``
    The name to check the server's certificate against (default: the target's host). Set it when the certificate
    names the service (``patchwire``) but not ``127.0.0.1``.
``PATCHWIRE_HEALTH_TIMEOUT``
    Seconds to wait for the answer (default 3).

Health needs no token, also on a server with authentication. The reason for a failure goes to stderr, one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 3.0


def _read(environ: Mapping[str, str], name: str) -> bytes | None:
    value = environ.get(name)
    return Path(value).read_bytes() if value else None


def channel(environ: Mapping[str, str]) -> grpc.Channel:
    """A channel to the probed server: TLS when the CA file named by ``PATCHWIRE_HEALTH_CA`` exists."""
    target = environ.get("PATCHWIRE_HEALTH_TARGET") or DEFAULT_TARGET
    options: list[tuple[str, str | int]] = [("grpc.enable_http_proxy", 0)]
    ca = environ.get("PATCHWIRE_HEALTH_CA")
    if not ca or not Path(ca).is_file():
        return grpc.insecure_channel(target, options=options)
    server_name = environ.get("PATCHWIRE_HEALTH_SERVER_NAME")
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = grpc.ssl_channel_credentials(
        Path(ca).read_bytes(), _read(environ, "PATCHWIRE_HEALTH_KEY"), _read(environ, "PATCHWIRE_HEALTH_CERT")
    )
    return grpc.secure_channel(target, credentials, options=options)


def check(environ: Mapping[str, str]) -> int:
    """Probes once; returns the exit status (0: SERVING) after printing the reason for anything else."""
    service = environ.get("PATCHWIRE_HEALTH_SERVICE", "")
    timeout = float(environ.get("PATCHWIRE_HEALTH_TIMEOUT") or DEFAULT_TIMEOUT_S)
    try:
        with channel(environ) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as exc:
        print(f"health check failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # an unreadable certificate file, a malformed timeout
        print(f"health check failed: {exc}", file=sys.stderr)
        return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"health check: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(check(os.environ))

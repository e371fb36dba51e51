"""TLS, identities, roles and job ownership, against real TLS servers with certificates made by ``patchwire certs``.

Identities (``auth.toml`` written here, plain tokens and digests both): alice and bob (write), reader (read), admin
(admin), and robot, known by the client certificate ``patchwire certs`` makes (read, write).

Long because the role table is checked method by method against servers with TLS, tokens and client certificates.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import patchwire.client as pw
from patchwire.cli import main
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.client._connection import Connection
from patchwire.service import PatchwireServer
from patchwire.service._auth import token_digest
from patchwire.service._certs import CLIENT_SUBJECT
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import assembly_service_pb2_grpc
from patchwire.wire import framing, tensors

from _servers import serve_process, server_in_thread

TOKENS = {name: f"{name}-token-{'x' * 24}" for name in ("alice", "bob", "reader", "admin")}
ROLES = {"alice": ["write"], "bob": ["write"], "reader": ["read"], "admin": ["admin"]}
SERVICES = ("patchwire.v1.DatasetService", "patchwire.v1.AssemblyService")
CODE = grpc.StatusCode


@dataclass(frozen=True)
class Certs:
    directory: Path
    auth: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def ca(self) -> bytes:
        return self.path("ca.crt").read_bytes()

    def tls(self) -> dict[str, object]:
        return {"tls_cert": self.path("server.crt"), "tls_key": self.path("server.key"), "auth_config": self.auth}


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """The development set of ``patchwire certs`` (run once) and an auth config with five identities."""
    directory = tmp_path_factory.mktemp("certs")
    assert main(["--log-level", "WARNING", "certs", str(directory), "--host", "patchwire.test"]) == 0
    lines = []
    for name, roles in ROLES.items():
        lines += ["[[identity]]", f'name = "{name}"', f"roles = {json.dumps(roles)}"]
        # alice's token by digest, the others plain: both forms are read
        if name == "alice":
            lines.append(f'token_sha256 = "{token_digest(TOKENS[name]).hex()}"')
        else:
            lines.append(f'token = "{TOKENS[name]}"')
    lines += ["[[identity]]", 'name = "robot"', 'roles = ["read", "write"]', f'subjects = ["{CLIENT_SUBJECT}"]']
    auth = directory / "test-auth.toml"
    auth.write_text("\n".join(lines) + "\n")
    return Certs(directory, auth)


@pytest.fixture(scope="module")
def tls_server(certs: Certs, tiny_h5: Path) -> Iterator[PatchwireServer]:
    with server_in_thread({"tiny": tiny_h5}, **certs.tls()) as srv:
        yield srv


def _connect(server: PatchwireServer, certs: Certs, who: str | None, **kwargs: Any) -> pw.Client:
    token = TOKENS[who] if who is not None else None
    return pw.connect(server.address, timeout=10, token=token, root_certificates=certs.ca, **kwargs)


@contextlib.contextmanager
def _channel(server: PatchwireServer, certs: Certs, token: str | None = None, **kwargs: Any) -> Iterator[grpc.Channel]:
    creds = pw.Credentials.make(token, certs.ca, **kwargs)
    channel = creds.channel(server.address, framing.channel_options())
    try:
        yield channel
    finally:
        channel.close()


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):
            list(result)
    return info.value.code()


def _call_every_method(channel: grpc.Channel) -> dict[str, grpc.StatusCode]:
    """Calls every method of both services with an empty request; the status code of each."""
    codes = {}
    for service_name in SERVICES:
        service = descriptor_pool.Default().FindServiceByName(service_name)
        for m in service.methods:
            path = f"/{service_name}/{m.name}"
            request = message_factory.GetMessageClass(m.input_type)()
            serialize = type(request).SerializeToString
            kind = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(m.client_streaming, m.server_streaming)]
            call = kind(path, request_serializer=serialize, response_deserializer=bytes)
            arg = iter([request]) if m.client_streaming else request
            codes[path] = _code(lambda call=call, arg=arg: call(arg, timeout=10))
    return codes


# -- the gate -------------------------------------------------------------------------------------------------------


def test_every_method_of_both_services_needs_credentials(tls_server: PatchwireServer, certs: Certs) -> None:
    with _channel(tls_server, certs) as channel:
        codes = _call_every_method(channel)
    assert len(codes) >= 17
    assert set(codes.values()) == {CODE.UNAUTHENTICATED}, codes


def test_a_wrong_token_is_unauthenticated_everywhere(tls_server: PatchwireServer, certs: Certs) -> None:
    with _channel(tls_server, certs, token="not-a-known-token-at-all") as channel:
        codes = _call_every_method(channel)
    assert set(codes.values()) == {CODE.UNAUTHENTICATED}, codes
    with pytest.raises(pw.AuthenticationError, match="unknown token"):
        pw.connect(tls_server.address, token="not-a-known-token-at-all", root_certificates=certs.ca)


def test_a_malformed_authorization_header_is_unauthenticated(tls_server: PatchwireServer, certs: Certs) -> None:
    with _channel(tls_server, certs) as channel:
        stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
        for header in ("Basic abc", "Bearer ", TOKENS["admin"]):
            assert _code(lambda h=header: stub.ListJobs(apb.ListJobsRequest(), metadata=[("authorization", h)])) == (
                CODE.UNAUTHENTICATED
            )


def test_health_stays_open_and_reflection_needs_an_identity(tls_server: PatchwireServer, certs: Certs) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with _channel(tls_server, certs) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        assert _code(lambda: reflect.ServerReflectionInfo(iter([request]), timeout=10)) == CODE.UNAUTHENTICATED
    with _channel(tls_server, certs, token=TOKENS["reader"]) as channel:
        [reply] = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=10)
        assert {s.name for s in reply.list_services_response.service} >= set(SERVICES)


def test_roles(tls_server: PatchwireServer, certs: Certs) -> None:
    with _connect(tls_server, certs, "reader") as reader:
        assert reader.datasets() == ["tiny"]
        ds = reader.datasource("tiny", extr.SliceIndexing())
        with pytest.raises(pw.PermissionDeniedError, match="'reader' lacks the 'write' role"):
            reader.assembler(ds, entries={"seg": 1}, shared_memory=False)
        with pytest.raises(pw.PermissionDeniedError):
            reader.jobs()
        ds.close()
    # a write-only identity is connected (the server answered) but may not read datasets
    with _connect(tls_server, certs, "alice") as alice:
        with pytest.raises(pw.PermissionDeniedError, match="'read' role"):
            alice.datasets()
        assert alice.jobs() == []


# -- ownership ------------------------------------------------------------------------------------------------------


def _job_as(server: PatchwireServer, certs: Certs, owner: str, job_id: str) -> None:
    """Creates ``job_id`` (slices of tiny, one float32 entry) as ``owner``."""
    with _connect(server, certs, "admin") as admin:
        spec = admin.datasource("tiny", extr.SliceIndexing())._spec
    with _channel(server, certs, token=TOKENS[owner]) as channel:
        stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
        stub.CreateJob(
            apb.CreateJobRequest(
                spec=spec,
                job_id=job_id,
                overlap_mode=apb.OVERLAP_MODE_OVERWRITE,
                entries=[apb.OutputEntry(name="seg", channels=1, dtype=tensors.dtype_to_proto(np.dtype("float32")))],
            ),
            timeout=10,
        )


def _attempts(job_id: str) -> dict[str, Any]:
    """Every call on an existing job, each as a function of a stub."""
    post = apb.PostPredictionsRequest(batch=apb.PredictionBatch(job_id=job_id, sample_indices=[0]))
    return {
        "status": lambda s: s.GetJobStatus(apb.GetJobStatusRequest(job_id=job_id), timeout=10),
        "post": lambda s: list(s.PostPredictions(iter([post]), timeout=10)),
        "subscribe": lambda s: list(s.SubscribeEvents(apb.SubscribeEventsRequest(job_id=job_id), timeout=10)),
        "fetch": lambda s: list(s.FetchSubject(apb.FetchSubjectRequest(job_id=job_id), timeout=10)),
        "export": lambda s: list(s.ExportSubject(apb.ExportSubjectRequest(job_id=job_id), timeout=10)),
        "abort": lambda s: s.AbortJob(apb.AbortJobRequest(job_id=job_id), timeout=10),
        "delete": lambda s: s.DeleteJob(apb.DeleteJobRequest(job_id=job_id), timeout=10),
    }


def test_another_identity_cannot_touch_a_job_or_see_it(
    tls_server: PatchwireServer, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    _job_as(tls_server, certs, "alice", "alices-job")
    with _channel(tls_server, certs, token=TOKENS["bob"]) as channel:
        bob = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
        for what, attempt in _attempts("alices-job").items():
            assert _code(lambda a=attempt: a(bob)) == CODE.PERMISSION_DENIED, what
        assert [j.job_id for j in bob.ListJobs(apb.ListJobsRequest(), timeout=10).jobs] == []
    with _connect(tls_server, certs, "bob") as client, pytest.raises(pw.PermissionDeniedError):
        client.job_status("alices-job")
    with _connect(tls_server, certs, "alice") as alice:
        assert [j.job_id for j in alice.jobs()] == ["alices-job"]
        assert alice.job_status("alices-job").state == "active"  # bob's abort and delete did nothing
    # admin sees every job and may delete it; the deletion is logged with the identity
    with _connect(tls_server, certs, "admin") as admin, caplog.at_level(logging.INFO):
        assert "alices-job" in [j.job_id for j in admin.jobs()]
        with _channel(tls_server, certs, token=TOKENS["admin"]) as channel:
            assembly_service_pb2_grpc.AssemblyServiceStub(channel).DeleteJob(
                apb.DeleteJobRequest(job_id="alices-job"), timeout=10
            )
        assert "alices-job" not in [j.job_id for j in admin.jobs()]
    assert any("alices-job deleted by admin" in r.getMessage() for r in caplog.records)


def test_create_job_with_another_identitys_id_does_not_hand_it_over(tls_server: PatchwireServer, certs: Certs) -> None:
    _job_as(tls_server, certs, "alice", "taken")
    with pytest.raises(grpc.RpcError) as info:
        _job_as(tls_server, certs, "bob", "taken")  # the very same parameters
    assert info.value.code() == CODE.PERMISSION_DENIED
    assert "seg" not in info.value.details() and "alice" not in info.value.details()
    with _connect(tls_server, certs, "admin") as admin:
        with _channel(tls_server, certs, token=TOKENS["alice"]) as channel:
            assembly_service_pb2_grpc.AssemblyServiceStub(channel).DeleteJob(
                apb.DeleteJobRequest(job_id="taken"), timeout=10
            )
        assert "taken" not in [j.job_id for j in admin.jobs()]


def test_create_and_abort_are_logged_with_the_identity(
    tls_server: PatchwireServer, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        _job_as(tls_server, certs, "bob", "bobs-job")
        with _channel(tls_server, certs, token=TOKENS["bob"]) as channel:
            stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
            stub.AbortJob(apb.AbortJobRequest(job_id="bobs-job"), timeout=10)
            stub.DeleteJob(apb.DeleteJobRequest(job_id="bobs-job"), timeout=10)
    messages = [r.getMessage() for r in caplog.records]
    assert any("created assembly job bobs-job" in m and m.endswith("for bob") for m in messages), messages
    assert any("bobs-job aborted by bob" in m for m in messages)
    assert any("bobs-job deleted by bob" in m for m in messages)


# -- the client library end to end ---------------------------------------------------------------------------------


def test_client_streams_and_assembles_over_tls_with_a_token(certs: Certs, tiny_h5: Path) -> None:
    """A ``patchwire serve`` child (DataLoader workers fork: the server must not live in this process)."""
    torch = pytest.importorskip("torch")
    from patchwire.client.torch import PytorchDatasetAdapter

    tls = ("--tls-cert", str(certs.path("server.crt")), "--tls-key", str(certs.path("server.key")))
    with (
        serve_process({"tiny": tiny_h5}, (*tls, "--auth-config", str(certs.auth))) as (_, address),
        pw.connect(address, token=TOKENS["admin"], root_certificates=certs.ca) as client,
    ):
        ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(categories=(defs.KEY_IMAGES,)))
        # the credentials travel with the pickled datasource into the DataLoader's worker: the copy is let in
        clone = pickle.loads(pickle.dumps(ds))
        assert np.array_equal(clone[3][defs.KEY_IMAGES], ds[3][defs.KEY_IMAGES])
        clone.close()
        loader = torch.utils.data.DataLoader(PytorchDatasetAdapter(ds), batch_size=10, num_workers=1)
        with client.assembler(ds, job_id="e2e", entries={"seg": 1}) as asm:
            seen = 0
            for batch in loader:
                images = batch[defs.KEY_IMAGES].numpy().astype(np.float32)
                indices = batch[defs.KEY_SAMPLE_INDEX].numpy()
                seen += len(images)
                asm.add_batch({"seg": images[..., :1]}, indices, last_batch=seen == len(ds))
            assert seen == len(ds) == 60
            volumes, _ = asm.fetch(1)
            expected = np.stack([ds[i][defs.KEY_IMAGES][..., :1] for i in range(20, 40)]).astype(np.float32)
            np.testing.assert_array_equal(volumes["seg"], expected)
            assert [j.job_id for j in client.jobs()] == ["e2e"]
            asm.delete()
        ds.close()


def test_mutual_tls_identifies_by_certificate_and_refuses_clients_without_one(certs: Certs, tiny_h5: Path) -> None:
    with server_in_thread({"tiny": tiny_h5}, **certs.tls(), tls_client_ca=certs.path("ca.crt")) as server:
        cert = {"client_certificate": certs.path("client.crt"), "client_key": certs.path("client.key")}
        with pw.connect(server.address, root_certificates=certs.ca, **cert) as robot:
            assert robot.datasets() == ["tiny"]
            assembler = robot.assembler(
                robot.datasource("tiny", extr.SliceIndexing()), job_id="robots", entries={"seg": 1}
            )
            assembler.close()
            assert [j.job_id for j in robot.jobs()] == ["robots"]
        # a token with a certificate: the token decides who calls (bob does not see robot's job)
        with pw.connect(server.address, token=TOKENS["bob"], root_certificates=certs.ca, **cert) as bob:
            assert bob.jobs() == []
        with pytest.raises(pw.ConnectionFailed):  # no client certificate: the handshake fails
            pw.connect(server.address, timeout=3, token=TOKENS["admin"], root_certificates=certs.ca)


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server: PatchwireServer) -> None:
    with pytest.raises(pw.ConnectionFailed):
        pw.connect(tls_server.address, timeout=3)


# -- the commands ---------------------------------------------------------------------------------------------------


def test_serve_with_tls_and_status_with_a_token(certs: Certs, tiny_h5: Path, tmp_path: Path) -> None:
    tls = ("--tls-cert", str(certs.path("server.crt")), "--tls-key", str(certs.path("server.key")))
    with serve_process({"tiny": tiny_h5}, (*tls, "--auth-config", str(certs.path("auth.toml")))) as (_, address):
        token_file = certs.path("admin.token")
        base = ["status", address, "--ca-cert", str(certs.path("ca.crt")), "--timeout", "10"]
        out, err = io.StringIO(), io.StringIO()
        from patchwire.cli import build_parser as _parser
        from patchwire.cli.status import run_status

        assert run_status(_parser().parse_args([*base, "--token-file", str(token_file)]), out, err) == 0, err.getvalue()
        assert out.getvalue().startswith("no assembly jobs on")
        out, err = io.StringIO(), io.StringIO()
        assert run_status(_parser().parse_args(base), out, err) == 1
        assert "credentials required" in err.getvalue()
        wrong = tmp_path / "wrong.token"
        wrong.write_text("x" * 30)
        assert run_status(_parser().parse_args([*base, "--token-file", str(wrong)]), out, err) == 1
        assert "unknown token" in err.getvalue()


def test_certs_command_writes_keys_private(certs: Certs) -> None:
    for name in ("ca.key", "server.key", "client.key", "reader.token", "writer.token", "admin.token"):
        assert certs.path(name).stat().st_mode & 0o777 == 0o600, name
    for name in ("ca.crt", "server.crt", "client.crt", "auth.toml"):
        assert certs.path(name).stat().st_mode & 0o077 == 0o044, name
    from cryptography import x509

    server = x509.load_pem_x509_certificate(certs.path("server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"localhost", "127.0.0.1", "::1", "patchwire.test"}


def test_certs_auth_config_tokens_work(certs: Certs, tiny_h5: Path) -> None:
    config = {**certs.tls(), "auth_config": certs.path("auth.toml")}
    with server_in_thread({"tiny": tiny_h5}, **config) as server:
        for name in ("reader", "writer", "admin"):
            token = certs.path(f"{name}.token").read_text().strip()
            with pw.connect(server.address, token=token, root_certificates=certs.ca) as client:
                assert client.datasets() == ["tiny"]
        token = certs.path("reader.token").read_text().strip()
        with (
            pw.connect(server.address, token=token, root_certificates=certs.ca) as client,
            pytest.raises(pw.PermissionDeniedError),
        ):
            client.jobs()


# -- durability of ownership ----------------------------------------------------------------------------------------


def test_ownership_survives_a_restart_and_ownerless_jobs_are_for_admins(
    certs: Certs, tiny_h5: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with server_in_thread({"tiny": tiny_h5}, **certs.tls(), state_dir=state) as server:
        _job_as(server, certs, "alice", "kept")
        _job_as(server, certs, "alice", "legacy")
    assert json.loads((state / "jobs" / "kept" / "job.json").read_text())["owner"] == "alice"
    legacy = state / "jobs" / "legacy" / "job.json"
    meta = json.loads(legacy.read_text())
    del meta["owner"]  # as written before jobs had owners
    legacy.write_text(json.dumps(meta))
    with server_in_thread({"tiny": tiny_h5}, **certs.tls(), state_dir=state) as server:
        with _connect(server, certs, "alice") as alice:
            assert [j.job_id for j in alice.jobs()] == ["kept"]
            with pytest.raises(pw.PermissionDeniedError):
                alice.job_status("legacy")
        with _connect(server, certs, "bob") as bob:
            assert bob.jobs() == []
            with pytest.raises(pw.PermissionDeniedError):
                bob.job_status("kept")
        with _connect(server, certs, "admin") as admin:
            assert sorted(j.job_id for j in admin.jobs()) == ["kept", "legacy"]


# -- credentials on the client --------------------------------------------------------------------------------------


def test_credentials_are_pickled_with_the_connection(certs: Certs) -> None:
    creds = pw.Credentials.make("t" * 20, certs.path("ca.crt"), certs.path("client.crt"), certs.path("client.key"))
    assert creds.root_certificates == certs.ca
    clone = pickle.loads(pickle.dumps(Connection("127.0.0.1:1", creds)))
    assert clone.credentials == creds
    assert "t" * 20 not in repr(creds) and "PRIVATE" not in repr(creds)


def test_a_token_without_tls_is_refused_on_the_client() -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        pw.Credentials.make("t" * 20)
    with pytest.raises(ValueError, match="go together"):
        pw.Credentials.make(None, b"ca", client_certificate=b"cert")
    assert pw.Credentials.make("t" * 20, tls=True).secure


def test_command_credentials_from_flags_and_environment(certs: Certs) -> None:
    from patchwire.cli import build_parser as _parser

    args = _parser().parse_args(["status", "h:1", "--ca-cert", str(certs.path("ca.crt"))])
    creds = pw.Credentials.from_args(args, {"PATCHWIRE_TOKEN": " from-env-token \n"})
    assert creds.token == "from-env-token" and creds.root_certificates == certs.ca
    args = _parser().parse_args(
        ["demo", "--token-file", str(certs.path("admin.token")), "--ca-cert", str(certs.path("ca.crt"))]
    )
    creds = pw.Credentials.from_args(args, {"PATCHWIRE_TOKEN": "ignored-when-a-file-is-given"})
    assert creds.token == certs.path("admin.token").read_text().strip()
    assert pw.Credentials.from_args(_parser().parse_args(["status", "h:1"]), {}) == pw.Credentials()

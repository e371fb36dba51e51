"""``patchwire --log-format json``: one JSON object per line, and a real server's lines about a call carry the request
id its client sent and knows."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

import patchwire.client as pw
from patchwire.cli import build_parser
from patchwire.cli._logging import JsonFormatter, configure_logging
from patchwire.cli.launch import launched, serve_command

from _servers import child_env


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    out = logging.LogRecord("patchwire.x", logging.WARNING, "f.py", 1, message, args, None)
    out.__dict__.update(extra)
    return out


def test_a_json_line_holds_the_record_and_its_call() -> None:
    line = JsonFormatter().format(
        record("%s: two\nlines", "one", request_id="r-1", method="/m", identity="alice", peer="ipv4:1.2.3.4:5")
    )
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed.pop("time").endswith("+00:00")
    assert parsed == {
        "level": "WARNING",
        "logger": "patchwire.x",
        "message": "one: two\nlines",
        "pid": parsed["pid"],
        "request_id": "r-1",
        "method": "/m",
        "identity": "alice",
        "peer": "ipv4:1.2.3.4:5",
    }
    outside = json.loads(JsonFormatter().format(record("plain")))
    assert set(outside) == {"time", "level", "logger", "message", "pid"}


def test_a_json_line_holds_a_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("patchwire.x", logging.ERROR, "f.py", 1, "failed", (), sys.exc_info())
    parsed = json.loads(JsonFormatter().format(failed))
    assert parsed["message"] == "failed" and parsed["exception"].endswith("ValueError: boom")


def test_the_flag_and_its_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["--log-format", "json", "status", "h:1"]).log_format == "json"
    assert build_parser().parse_args(["status", "h:1"]).log_format is None  # (the config file's or text)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--log-format", "xml", "status", "h:1"])
    assert "invalid choice: 'xml'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="log format: expected one of text, json"):
        configure_logging("INFO", "xml")


def test_a_real_servers_json_lines_carry_the_clients_request_id(tiny_h5: Path) -> None:
    command = serve_command({"tiny": tiny_h5}, log_level="WARNING")
    command[command.index("serve") : command.index("serve")] = ["--log-format", "json"]
    with launched(command, env=child_env()) as server:
        with pw.connect(server.address) as client, pytest.raises(pw.NotFoundError) as info:
            client.datasource("nope")
        server.process.terminate()
        _, stderr = server.process.communicate(timeout=30)
    request_id = info.value.request_id
    assert request_id is not None
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]  # every line is one JSON object
    about = [line for line in lines if line.get("request_id") == request_id]
    assert len(about) == 1, lines
    (refusal,) = about
    assert refusal["level"] == "WARNING" and refusal["logger"] == "patchwire.service._errors"
    assert "unknown dataset 'nope'" in refusal["message"]
    assert refusal["method"] == "/patchwire.v1.DatasetService/OpenDatasource"
    assert refusal["identity"] == "anonymous" and refusal["peer"].startswith("ipv4:127.0.0.1:")

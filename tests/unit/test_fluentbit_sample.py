"""The packaged Fluent Bit sample fits the agent's log file (Fluent Bit itself is not in Debian 12).

What can be checked without the tool is checked: the configuration's structure and
cross-references, that its tail path covers the file logrotate rotates, and that its parser's
time format reads the timestamps the agent really writes. Where a ``fluent-bit`` binary is
installed, its own --dry-run checks the files too.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ecs import check_event
from watcher.config import LogConfig
from watcher.core.catalogue import Event
from watcher.outputs.logpipeline import configure

SAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "fluent-bit"
LOGROTATE = Path(__file__).resolve().parents[2] / "packaging" / "sslvpn-heartbeat.logrotate"
AGENT_LOG = "/var/log/sslvpn-heartbeat/agent.log"


def sections(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Fluent Bit's classic format: [SECTION] headers, then indented "Key Value" lines."""
    out: list[tuple[str, dict[str, str]]] = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            out.append((line[1:-1], {}))
            continue
        assert raw.startswith("    ") and out, f"{path.name}:{n}: not an indented entry: {raw!r}"
        key, _, value = line.partition(" ")
        assert value.strip(), f"{path.name}:{n}: {key} has no value"
        assert key.lower() not in {k.lower() for k in out[-1][1]}, f"{path.name}:{n}: {key} twice"
        out[-1][1][key] = value.strip()
    return out


def one(secs: list[tuple[str, dict[str, str]]], name: str) -> dict[str, str]:
    """The only section called ``name``."""
    found = [body for sec, body in secs if sec == name]
    assert len(found) == 1, f"expected one [{name}], found {len(found)}"
    return found[0]


def agent_lines() -> list[str]:
    """Lines as the agent's file sink writes them, including an exception and non-ASCII text."""
    stream = io.StringIO()
    with configure(LogConfig(), service_name="novell-sslvpn", stream=stream) as lg:
        log = lg.logger()
        log.info(Event.FIREWALL_BLOCK, reason="service down", latency_ms=1.8, detail="pid 4242 ü")
        try:
            raise PermissionError(1, "Operation not permitted")
        except PermissionError:
            log.exception(Event.INTERNAL_ERROR)
    return stream.getvalue().splitlines()


def test_input_tail_covers_the_file_logrotate_rotates() -> None:
    """The tail input reads the agent's file, and its glob is the packaged logrotate glob."""
    inp = one(sections(SAMPLE / "sslvpn-heartbeat.conf"), "INPUT")
    assert inp["Name"] == "tail"
    assert fnmatch.fnmatch(AGENT_LOG, inp["Path"])
    globs = re.findall(r"^(\S+)\s*\{", LOGROTATE.read_text(), re.M)
    assert inp["Path"] in globs, f"{inp['Path']} is not rotated by {LOGROTATE.name}: {globs}"
    assert inp["DB"].startswith("/var/lib/"), "without a DB a restart re-reads or skips lines"
    assert int(inp["Rotate_Wait"]) >= 2, "a line in flight at the rename lands in the renamed file"


def test_references_resolve() -> None:
    """The parsers file exists, the input's parser is defined there, the output matches the tag."""
    secs = sections(SAMPLE / "sslvpn-heartbeat.conf")
    parsers_file = SAMPLE / one(secs, "SERVICE")["Parsers_File"]
    parsers = {body["Name"]: body for sec, body in sections(parsers_file) if sec == "PARSER"}
    inp, out = one(secs, "INPUT"), one(secs, "OUTPUT")
    assert inp["Parser"] in parsers
    assert fnmatch.fnmatch(inp["Tag"], out["Match"])
    assert out["Replace_Dots"] == "Off", "ECS dotted keys must reach Elasticsearch as they are"


def test_parser_reads_the_agents_real_lines() -> None:
    """Every agent line is single-line ECS JSON with the parser's time key in the parser's format."""
    parser = one(sections(SAMPLE / "sslvpn-heartbeat-parsers.conf"), "PARSER")
    assert parser["Format"] == "json"
    # Fluent Bit's %L is the fractional seconds; Python's %f reads the same digits.
    fmt = parser["Time_Format"].replace("%L", "%f")
    lines = agent_lines()
    assert len(lines) == 2
    for line in lines:
        ev = json.loads(line)
        check_event(ev)
        stamp = ev[parser["Time_Key"]]
        parsed = dt.datetime.strptime(stamp, fmt)
        assert parsed.microsecond % 1000 == 0 and stamp.endswith("Z")
    # the multi-line traceback stayed inside one line (Fluent Bit's json parser needs that)
    assert json.loads(lines[1])["error.stack_trace"].count("\n") >= 2


@pytest.mark.skipif(shutil.which("fluent-bit") is None, reason="fluent-bit is not in Debian 12")
def test_fluent_bit_accepts_the_configuration() -> None:
    """Where Fluent Bit is installed, its --dry-run accepts the sample."""
    proc = subprocess.run(["fluent-bit", "--dry-run", "-c", str(SAMPLE / "sslvpn-heartbeat.conf")],
                          capture_output=True, text=True, timeout=30, cwd=SAMPLE)
    assert proc.returncode == 0, proc.stderr + proc.stdout

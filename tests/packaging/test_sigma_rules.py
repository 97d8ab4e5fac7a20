"""packaging/sigma/sslvpn-heartbeat.yml: valid Sigma, converted by a real backend, and true to
the events the agent really writes.

pySigma parses the file and runs every validator it ships; the Elasticsearch backend
(pySigma-backend-elasticsearch) converts each rule to a Lucene query. Then each rule's
detection is matched against lines the logging pipeline renders for the events it names, so a
renamed event, field or message breaks the test, not the SIEM's alert.
"""

from __future__ import annotations

import fnmatch
import io
import json
from pathlib import Path
from typing import Any

import yaml
from sigma.backends.elasticsearch import LuceneBackend
from sigma.collection import SigmaCollection
from sigma.validation import SigmaValidator
from sigma.validators.core import validators

from rules.errors import ForeignChain
from tests.ecs import custom_fields, ecs_fields
from tests.netns import REPO
from watcher.config import LogConfig
from watcher.core.catalogue import Event
from watcher.outputs.logpipeline import configure

RULES = REPO / "packaging" / "sigma" / "sslvpn-heartbeat.yml"
# Named by a rule before its event is in this branch's catalogue (the fleet guard's refusal).
NOT_YET_CATALOGUED = {"fleet-guard-refused"}
ONLINE_VALIDATORS = {"attacktag", "d3_fendtag"}


def rules() -> list[dict[str, Any]]:
    """The rules as plain YAML documents."""
    return [d for d in yaml.safe_load_all(RULES.read_text()) if d]


def test_pysigma_parses_and_every_validator_passes() -> None:
    """pySigma reads every rule without an error, and none of its validators has an issue."""
    collection = SigmaCollection.from_yaml(RULES.read_text(), collect_errors=True)
    assert len(collection.rules) == len(rules()) >= 5
    assert not [(r.title, r.errors) for r in collection.rules if r.errors]
    # Every validator but the two that download MITRE's ATT&CK and D3FEND catalogues (the
    # tests have no network); the tags' form is still checked by the tag format validators.
    offline = [v for name, v in validators.items() if name not in ONLINE_VALIDATORS]
    assert len(offline) == len(validators) - len(ONLINE_VALIDATORS) > 20
    issues = SigmaValidator(offline).validate_rules(collection)
    assert not issues, "\n".join(str(i) for i in issues)


def test_the_elasticsearch_backend_converts_every_rule() -> None:
    """Each rule becomes one Lucene query that names its events."""
    collection = SigmaCollection.from_yaml(RULES.read_text())
    queries = LuceneBackend().convert(collection)
    assert len(queries) == len(collection.rules)
    for rule, query in zip(rules(), queries, strict=True):
        for action in actions(rule):
            assert action.replace("-", "\\-") in str(query), (rule["title"], query)  # Lucene escapes -
    print("\n" + "\n".join(str(q) for q in queries))


def actions(rule: dict[str, Any]) -> set[str]:
    """The event.action values a rule's detection names."""
    out: set[str] = set()
    for name, sel in rule["detection"].items():
        if name != "condition":
            v = sel.get("event.action")
            out |= set(v) if isinstance(v, list) else {v}
    return out


def test_fields_and_events_are_the_agents() -> None:
    """Every field a rule matches or lists is an ECS 8.11 field or a documented own field, and
    every event it names is in the catalogue; the ids are unique."""
    known = set(ecs_fields()) | set(custom_fields())
    for rule in rules():
        used = {k.split("|")[0] for name, sel in rule["detection"].items() if name != "condition"
                for k in sel}
        assert used | set(rule.get("fields", [])) <= known, rule["title"]
        assert actions(rule) - set(Event) <= NOT_YET_CATALOGUED, rule["title"]
    ids = [r["id"] for r in rules()]
    assert len(ids) == len(set(ids))


def _value_matches(value: Any, key: str, want: Any) -> bool:
    wants = want if isinstance(want, list) else [want]
    if key.endswith("|contains"):
        return isinstance(value, str) and any(str(w) in value for w in wants)
    return any(value == w if isinstance(w, bool) else
               isinstance(value, str) and fnmatch.fnmatchcase(value, str(w)) for w in wants)


def matches(rule: dict[str, Any], event: dict[str, Any]) -> bool:
    """A plain reading of the rules' Sigma: maps of field -> value(s), ``|contains``, and the
    conditions ``selection`` or ``1 of selection_*``."""
    det = rule["detection"]
    hit = {name: all(_value_matches(event.get(k.split("|")[0]), k, v) for k, v in sel.items())
           for name, sel in det.items() if name != "condition"}
    if det["condition"] == "selection":
        return hit["selection"]
    assert det["condition"] == "1 of selection_*", det["condition"]
    return any(v for k, v in hit.items() if k.startswith("selection_"))


def rendered(*calls: tuple[str, Event | str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines the logging pipeline writes for these calls (level, event, fields)."""
    stream = io.StringIO()
    p = configure(LogConfig(), service_name="novell-sslvpn", stream=stream, hostname="vpn1")
    try:
        log = p.logger()
        for level, event, fields in calls:
            getattr(log, level)(event, **fields)
        assert p.flush()
    finally:
        p.close()
    return [json.loads(x) for x in stream.getvalue().splitlines()]


def test_rules_fire_on_the_agents_own_lines_and_not_on_others(tmp_path: Path) -> None:
    """Lines as the agent writes them: each security event fires its rule (the foreign chain by
    the real exception's words), and routine events fire none."""
    foreign = str(ForeignChain("sslvpn-heartbeat-chain", ("-A sslvpn-heartbeat-chain -j ACCEPT",)))
    lines = rendered(
        ("warning", Event.FIREWALL_REPAIR, {"trigger": "timer", "mode": "block", "reason": "chain flushed"}),
        ("info", Event.ADMIN_UNBLOCK, {"trigger": "admin", "had_block": True}),
        ("error", Event.CONFIG_INVALID, {"reason": foreign, "path": "/etc/x.toml"}),
        ("error", Event.APPLY_FAILED, {"reason": foreign, "fatal": True, "mode": "block"}),
        ("error", "fleet-guard-refused", {"reason": "min_open"}),
        ("warning", Event.LOG_DROPPED, {"sink": "queue", "dropped": 3, "dropped_first": 7,
                                        "dropped_last": 9}),
        ("info", Event.FIREWALL_BLOCK, {"trigger": "pidfd"}),
        ("info", Event.SERVICE_UP, {}),
        ("error", Event.CONFIG_INVALID, {"reason": "probe.rise: must be >= 1"}),
        ("error", Event.APPLY_FAILED, {"reason": "xtables lock", "fatal": False}),
    )
    by_title = {r["title"]: r for r in rules()}
    fired = {i: [t for t, r in by_title.items() if matches(r, ev)] for i, ev in enumerate(lines)}
    assert fired[0] == ["sslvpn-heartbeat chain tampered with and repaired"]
    assert fired[1] == ["sslvpn-heartbeat admin unblock"]
    assert fired[2] == fired[3] == ["sslvpn-heartbeat foreign chain refused"]
    assert fired[4] == ["sslvpn-heartbeat fleet guard refused a block"]
    assert fired[5] == ["sslvpn-heartbeat lost log lines"]
    assert fired[6] == fired[7] == fired[8] == fired[9] == []

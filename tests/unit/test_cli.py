"""watcher.cli.commands in process, without root: usage errors, --help, config-check and its exit codes.

Only paths that stop before touching the firewall are exercised here (argument parsing and
configuration loading); tests/integration/test_cli_errors.py runs the rest in a namespace.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from watcher.cli.commands import main
from watcher.errors import EX_CONFIG, EX_OK, EX_USAGE

SUBCOMMANDS = ["run", "check", "status", "block", "unblock", "cleanup", "config-check"]


@pytest.fixture(autouse=True)
def _no_firewall_reachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """These tests run in the initial network namespace, perhaps as root: with no iptables on
    PATH and the in-process backend ruled out, a regression that got past the config check
    would fail with "iptables not found" instead of changing this namespace's firewall."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    import rules.firewall

    def refuse(*_a: object, **_k: object) -> object:
        raise AssertionError("a unit test reached the firewall backend")

    monkeypatch.setattr(rules.firewall, "IptcBackend", refuse)


def _write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints usage naming every subcommand and exits 0."""
    assert main(["--help"]) == EX_OK
    out = capsys.readouterr().out
    assert "usage: sslvpn-heartbeat" in out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help_exits_0_and_offers_config(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every subcommand has --help (exit 0) and takes --config."""
    assert main([sub, "--help"]) == EX_OK
    assert "--config" in capsys.readouterr().out


def test_version_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the program name and exits 0."""
    assert main(["--version"]) == EX_OK
    assert "sslvpn-heartbeat" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["--no-such-option", "status"],
    ["status", "--no-such-option"],
    ["block", "--drain=yes"],
    ["config-check", "extra-argument"],
    ["run", "--log-format", "xml"],
    ["block", "--config"],
], ids=lambda a: " ".join(a) or "(nothing)")
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A missing or unknown subcommand, an unknown option or a bad option value exits 2 with usage."""
    assert main(argv) == EX_USAGE
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("reason", ["two\nlines", "tab\there", "nul\x00", "x" * 513, "bell\x07"])
def test_reason_must_be_printable_and_short(reason: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """block --reason with a newline, another control character or over 512 characters exits 2."""
    cfg = _write(tmp_path, f'[state]\ndir = "{tmp_path / "state"}"\n')
    assert main(["block", "--reason", reason, "--config", str(cfg)]) == EX_USAGE
    assert "--reason" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_config_check_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """config-check on a valid file exits 0 and says the file is ok; as root with no iptables
    reachable, it also says that the firewall (a foreign chain) was not checked."""
    cfg = _write(tmp_path, '[service]\nport = 8443\n[firewall]\nbackend = "restore"\n'
                           f'[state]\ndir = "{tmp_path}"\n')
    assert main(["config-check", "--config", str(cfg)]) == EX_OK
    captured = capsys.readouterr()
    assert captured.out.strip() == f"{cfg}: ok"
    if os.geteuid() == 0:
        assert captured.err == "firewall not checked: iptables not found on PATH\n"
    else:
        assert captured.err == ""


def test_config_check_empty_file(tmp_path: Path) -> None:
    """config-check accepts an empty file (all defaults)."""
    assert main(["config-check", "--config", str(_write(tmp_path, ""))]) == EX_OK


@pytest.mark.parametrize(("text", "named"), [
    ("[service]\nport = 0\n", "service.port"),
    ("[service]\nport = true\n", "service.port"),
    ("[probe]\nrise = 0\n", "probe.rise"),
    ('[firewall]\nbackend = "nftables"\n', "firewall.backend"),
    ('[firewall]\nchain = "INPUT"\n', "firewall.chain"),
    ('[firewall]\nreject_with = "drop"\n', "firewall.reject_with"),
    ('[log]\nlevel = "loud"\n', "log.level"),
    ('[state]\ndir = "relative"\n', "state.dir"),
    ("[probe]\nrize = 2\n", "probe.rize"),
    ("[servise]\nport = 1\n", "servise"),
], ids=lambda v: v if "\n" not in v else None)
def test_config_check_bad_value_exits_78_naming_key(text: str, named: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """config-check on a bad value or unknown key exits 78 and names the key on stderr."""
    cfg = _write(tmp_path, text)
    assert main(["config-check", "--config", str(cfg)]) == EX_CONFIG
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "configuration error" in captured.err
    assert named in captured.err
    assert str(cfg) in captured.err
    assert captured.err.count("\n") == 1, "one line, no traceback"


@pytest.mark.parametrize(("content", "says"), [
    (b"[service\n", "TOML syntax error"),
    (b'[service]\nname = "caf\xe9"\n', "not UTF-8"),
    (b"#" * ((1 << 20) + 1), "larger than"),
])
def test_config_check_unreadable_file_exits_78(content: bytes, says: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """config-check on a file that is not valid TOML, not UTF-8 or too large exits 78 saying why."""
    cfg = tmp_path / "config.toml"
    cfg.write_bytes(content)
    assert main(["config-check", "--config", str(cfg)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert says in err and str(cfg) in err


def test_config_check_missing_file_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """config-check with a --config file that does not exist exits 78 naming the file."""
    missing = tmp_path / "absent.toml"
    assert main(["config-check", "--config", str(missing)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "no such configuration file" in err and str(missing) in err


@pytest.mark.parametrize("sub", ["status", "block", "unblock", "cleanup", "check", "run"])
def test_bad_config_stops_every_subcommand_with_78(sub: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Every subcommand loads the config first: a bad value exits 78 before anything else runs."""
    cfg = _write(tmp_path, f'[state]\ndir = "{tmp_path / "state"}"\n[service]\nport = 70000\n')
    assert main([sub, "--config", str(cfg)]) == EX_CONFIG
    assert "service.port" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("sub", ["status", "block", "unblock", "cleanup"])
def test_explicit_missing_config_is_an_error(sub: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A --config path given explicitly but absent exits 78; only the default path may be missing."""
    missing = tmp_path / "absent.toml"
    assert main([sub, "--config", str(missing)]) == EX_CONFIG
    assert str(missing) in capsys.readouterr().err


def test_config_before_subcommand_is_honoured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--config PATH config-check` checks PATH, like `config-check --config PATH`."""
    cfg = _write(tmp_path, "[service]\nport = 0\n")
    assert main(["--config", str(cfg), "config-check"]) == EX_CONFIG
    assert str(cfg) in capsys.readouterr().err


def _state_cfg(tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "state"
    return _write(tmp_path, f'[state]\ndir = "{state}"\n'), state


@pytest.mark.parametrize(("argv", "words"), [
    (["block", "--wait"], "--wait needs --drain"),
    (["block", "--drain", "--timeout", "5"], "--timeout needs --wait"),
    (["block", "--timeout", "5"], "--timeout needs --wait"),
    (["block", "--for", "90"], "90s, 30m, 2h"),
    (["block", "--drain", "--for", "1.5h"], "90s, 30m, 2h"),
    (["block", "--for", "0s"], "longer than 0s"),
])
def test_block_usage_errors_exit_2_naming_the_problem_and_record_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], words: str) -> None:
    """--wait without --drain, --timeout without --wait and a bad --for are exit 2 with a
    message naming the problem; no admin record is written (the state directory stays absent)."""
    cfg, state = _state_cfg(tmp_path)
    assert main([*argv, "--config", str(cfg)]) == EX_USAGE
    assert words in capsys.readouterr().err
    assert not state.exists()


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf"])
def test_bad_timeout_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      value: str) -> None:
    """--timeout takes a positive finite number of seconds; anything else is exit 2 naming it."""
    cfg, state = _state_cfg(tmp_path)
    assert main(["block", "--drain", "--wait", "--timeout", value, "--config", str(cfg)]) == EX_USAGE
    assert "--timeout" in capsys.readouterr().err
    assert not state.exists()


def test_check_nagios_bad_config_is_unknown_3_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check --nagios with an invalid configuration prints one UNKNOWN line naming the key and
    exits 3 (the plugin API), where every other command exits 78."""
    cfg = _write(tmp_path, "[probe]\nrise = 0\n")
    assert main(["check", "--nagios", "--config", str(cfg)]) == 3
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("SSLVPN-HEARTBEAT UNKNOWN - configuration error")
    assert "probe.rise" in out[0]
    assert main(["check", "--config", str(cfg)]) == EX_CONFIG


def test_check_nagios_bad_arguments_are_unknown_3(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown option next to check --nagios exits 3 with an UNKNOWN line, not argparse's 2."""
    assert main(["check", "--nagios", "--bogus"]) == 3
    assert capsys.readouterr().out.startswith("SSLVPN-HEARTBEAT UNKNOWN - ")

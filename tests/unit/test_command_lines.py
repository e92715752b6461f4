"""Every command line explains every flag: ``--help`` of each program and subcommand gives each
option a line of help, and the agent's flags name their default and their environment variable
(they are generated from ``AgentSettings``, so a new setting cannot arrive without them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune_agent.settings import AgentSettings, env_name, parse_args, parser

REPO = Path(__file__).resolve().parents[2]
COMMANDS = [
    ["edgetune_agent"],
    ["edgetune_trainer"],
    ["edgetune_trainer", "evaluate"],
    ["edgetune_trainer", "pretrain"],
    ["edgetune_trainer", "prepare-work-dir"],
    ["edgetune_operator"],
    ["edgetune_api"],
    ["edgetune_dashboards"],
    *[["edgetune_cli", sub] for sub in ("get", "watch", "status", "promote", "resume", "abort", "delete", "logs")],
    ["edgetune_cli"],
    *[["edgetune_testenv", sub] for sub in ("binaries", "manifests", "images", "demo", "env")],
    ["edgetune_testenv"],
]


def options_without_help(text: str) -> list[str]:
    """Option entries of an argparse help text with no description beside or under them."""
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        if not re.match(r"^  -", line) or line.strip().startswith("-h, --help"):
            continue
        beside = len(re.split(r"\s{2,}", line.strip(), maxsplit=1)) > 1
        under = i + 1 < len(lines) and re.match(r"^\s{20,}\S", lines[i + 1]) is not None
        if not (beside or under):
            missing.append(line.strip())
    return missing


def test_the_checker_sees_a_flag_without_help() -> None:
    assert options_without_help("options:\n  -h, --help  show\n  --steps STEPS\n  --seed SEED  the seed\n") == [
        "--steps STEPS"]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_flag_has_a_line_of_help(command: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", *command, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
    assert options_without_help(done.stdout) == []


def test_every_agent_setting_is_a_flag_with_its_default_and_its_variable() -> None:
    text = parser().format_help()
    flat = " ".join(text.split())
    for name, field in AgentSettings.model_fields.items():
        assert field.description, f"{name} has no docstring"
        assert env_name(name) in flat, name
    assert "(default: 8080; env EDGETUNE_AGENT_PORT)" in flat
    assert "turn off: add the active adapter's update into the base weights" in flat.lower()


def test_agent_settings_come_from_flags_then_the_environment_then_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGETUNE_AGENT_BASE_URI", "builtin:timeseries-cnn")
    monkeypatch.setenv("EDGETUNE_AGENT_HOSTS", "127.0.0.1,::1")
    monkeypatch.setenv("EDGETUNE_AGENT_MERGE", "false")
    monkeypatch.setenv("EDGETUNE_AGENT_PORT", "9000")
    monkeypatch.setenv("POD_NAME", "agent-0")
    s = parse_args(["--port", "9100", "--eval-max-drop", "0.05"])
    assert (s.port, s.hosts, s.merge) == (9100, ["127.0.0.1", "::1"], False)
    assert (s.pod_name, s.eval_max_drop) == ("agent-0", 0.05)
    assert (s.report, s.backend, s.revocation_poll_seconds) == (True, "torch", 30.0)  # defaults
    s = parse_args(["--no-report", "--host", "10.0.0.7"])
    assert (s.report, s.hosts, s.port) == (False, ["10.0.0.7"], 9000)
    monkeypatch.delenv("EDGETUNE_AGENT_BASE_URI")
    with pytest.raises(SystemExit):
        parse_args([])

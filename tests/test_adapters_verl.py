"""verl 0.9.1's own reward path with the adapter: its loader (``pkg://`` and file path), ``NaiveRewardManager``,
``RewardLoopWorker`` and the Ray ``RewardLoopManager``, on batches built from ``grape-rewards prepare`` parquet
rows, scored by the real reward service (and in-process)."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from test_adapters_support import (
    REPO,
    Service,
    clear_grape_env,
    dead_url,
    demo_index_dir,
    demo_scorer,
    require,
    smol_tokenizer,
)
from test_adapters_support import smol_tokenizer_dir as tokenizer_dir

from grape_rewards.adapters.cli import adapter_file
from grape_rewards.labels import parse_label
from grape_rewards.prepare import TrainingQuery, label_json, write_training_data
from grape_rewards.scorer import RewardItem

QUERIES = [
    TrainingQuery("zh-frisbee", "一只棕色的狗在阳光明媚的公园里接飞盘", ("cap000",), language="zh", split="train"),
    TrainingQuery("long-wine", "the man in the black vest fills everyone's glasses with red wine before the toasts",
                  ("cap038",), task="longform", split="train"),
]
RESPONSES = [
    "<think>translate</think><answer>A brown dog catching a frisbee in a sunny park.</answer><|im_end|>",
    "<answer>Restaurant, wine, glasses, toast.</answer><|im_end|>",
    "<think>no idea</think><answer> </answer><|im_end|>",
]
KEYS = ("score", *demo_scorer().keys)  # sample_keys(config), then the alarm flags


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No GRAPE_* adapter setting leaks in from the environment."""
    return clear_grape_env(monkeypatch)


def base_overrides(parquet: str = "/tmp/train.parquet", model: str = "/tmp/model") -> list[str]:
    """A GRPO run as examples/verl_*.sh launches it (composes and validates on CPU)."""
    return [
        "algorithm.adv_estimator=grpo", "algorithm.use_kl_in_reward=False",
        f"data.train_files={parquet}", f"data.val_files={parquet}", "data.train_batch_size=8",
        "data.max_prompt_length=512", "data.max_response_length=256",
        f"actor_rollout_ref.model.path={model}", "actor_rollout_ref.actor.optim.lr=1e-6",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_coef=0.001",
        "actor_rollout_ref.actor.kl_loss_type=low_var_kl", "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.n=8", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4", "trainer.logger=[console]",
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1", "reward.num_workers=2",
        "reward.custom_reward_function.name=compute_score",
    ]


def reward_overrides(path: str, **kwargs: Any) -> list[str]:
    out = [f"reward.custom_reward_function.path={path}"]
    return out + [f"+reward.custom_reward_function.reward_kwargs.{k}={v}" for k, v in kwargs.items()]


def compose(overrides: list[str]) -> Any:
    require("verl", "hydra")
    from grape_rewards.adapters.checks import compose_verl_config

    return compose_verl_config(overrides)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    with Service() as svc:
        yield svc


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The prepared verl parquet, read back with HF datasets (as verl's RLHFDataset reads it)."""
    require("verl", "datasets")
    from datasets import load_dataset

    out = tmp_path_factory.mktemp("verl_data")
    summary = write_training_data(QUERIES, out, formats=["verl"], data_source="grape_demo")
    return list(load_dataset("parquet", data_files=summary.files["verl"])["train"])


def make_batch(tok: Any, rows: list[dict[str, Any]], pairs: list[tuple[int, str]]) -> Any:
    """verl's batch (prompts left-padded, responses right-padded, the parquet's non-tensor columns per sample)."""
    import numpy as np
    import torch
    from verl import DataProto

    prompts = [list(tok.apply_chat_template(rows[r]["prompt"], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]) for r, _ in pairs]
    responses = [tok(text, add_special_tokens=False)["input_ids"] for _, text in pairs]
    pl, rl, pad = max(map(len, prompts)), max(map(len, responses)), tok.pad_token_id
    p = torch.tensor([[pad] * (pl - len(x)) + x for x in prompts])
    r = torch.tensor([x + [pad] * (rl - len(x)) for x in responses])
    mask = torch.tensor([[0] * (pl - len(x)) + [1] * (len(x) + len(y)) + [0] * (rl - len(y))
                         for x, y in zip(prompts, responses)])
    column = {k: np.array([rows[i][k] for i, _ in pairs], dtype=object)
              for k in ("data_source", "reward_model", "extra_info")}
    return DataProto.from_dict(
        tensors={"prompts": p, "responses": r, "attention_mask": mask, "input_ids": torch.cat([p, r], 1),
                 "position_ids": torch.clamp(torch.cumsum(mask, 1) - 1, min=0)},
        non_tensors=column), responses


def expected_reward(row: int, response: str) -> float:
    """The reward of ``response`` to query ``row``, scored directly (no framework, no service)."""
    label = parse_label(label_json(QUERIES[row]))
    item = RewardItem(completion=response, target_ids=label.target_ids, original_query=label.original_query)
    return demo_scorer().score([item])[0]["reward"]


# -- the loader --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("path", ["pkg://grape_rewards.adapters.verl", "installed-file", "source-file"])
def test_verl_loader_finds_an_async_compute_score(path: str, service: Service, rows: list[dict[str, Any]]) -> None:
    from verl.trainer.ppo.reward import get_custom_reward_fn

    path = {"installed-file": str(adapter_file("verl")),
            "source-file": str(REPO / "adapters" / "verl" / "reward_fn.py")}.get(path, path)
    cfg = compose(base_overrides() + reward_overrides(path, url=service.url))
    fn = get_custom_reward_fn(cfg)
    assert inspect.iscoroutinefunction(fn)  # verl awaits it on the reward worker's loop
    row = rows[0]
    out = asyncio.run(fn(data_source=row["data_source"], solution_str=RESPONSES[0],
                         ground_truth=row["reward_model"]["ground_truth"], extra_info=row["extra_info"]))
    assert tuple(out) == KEYS and out["score"] == out["reward"] == pytest.approx(expected_reward(0, RESPONSES[0]))
    assert out["rank"] == 1.0


# -- the reward loop -----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["service", "in_process"])
def test_naive_reward_manager_run_single(backend: str, service: Service, rows: list[dict[str, Any]]) -> None:
    from verl.trainer.ppo.reward import load_reward_manager

    kwargs = {"url": service.url} if backend == "service" else {"index": demo_index_dir(), "device": "cpu"}
    cfg = compose(base_overrides() + reward_overrides("pkg://grape_rewards.adapters.verl", **kwargs))
    tok = smol_tokenizer()
    pairs = [(0, RESPONSES[0]), (1, RESPONSES[1]), (0, RESPONSES[2])]
    data, _ = make_batch(tok, rows, pairs)

    async def main() -> list[dict[str, Any]]:
        manager = load_reward_manager(cfg, tok)  # built inside the loop it runs on
        assert manager.is_async_reward_score
        return list(await asyncio.gather(*(manager.run_single(data[i:i + 1]) for i in range(len(pairs)))))

    outs = asyncio.run(main())
    for (row, response), out in zip(pairs, outs):
        assert tuple(out["reward_extra_info"]) == KEYS  # the same keys for every sample
        assert out["reward_score"] == pytest.approx(expected_reward(row, response.replace("<|im_end|>", "")))
    assert outs[2]["reward_score"] == -1.0 and outs[2]["reward_extra_info"]["format_ok"] == 0.0
    assert rows[0]["extra_info"]["query_id"] == "zh-frisbee"  # verl writes into extra_info; the adapter only reads


@pytest.mark.slow
def test_reward_loop_worker_in_process(service: Service, rows: list[dict[str, Any]]) -> None:
    from verl.experimental.reward_loop import RewardLoopWorker

    cfg = compose(base_overrides(model=tokenizer_dir())
                  + reward_overrides("pkg://grape_rewards.adapters.verl", url=service.url))
    data, _ = make_batch(smol_tokenizer(), rows, [(0, RESPONSES[0]), (1, RESPONSES[1])])

    async def main() -> list[dict[str, Any]]:
        return await RewardLoopWorker(cfg).compute_score_batch(data)

    outs = asyncio.run(main())
    assert [o["reward_score"] for o in outs] == pytest.approx(
        [expected_reward(0, RESPONSES[0]), expected_reward(1, RESPONSES[1])])


@pytest.mark.slow
def test_reward_loop_manager_on_ray(service: Service, rows: list[dict[str, Any]]) -> None:
    """The full CPU path: RewardLoopManager -> Ray RewardLoopWorker actors -> pkg:// adapter -> the service."""
    require("ray")
    import ray
    from verl.experimental.reward_loop import RewardLoopManager

    cfg = compose(base_overrides(model=tokenizer_dir())
                  + reward_overrides("pkg://grape_rewards.adapters.verl", url=service.url))
    pairs = [(0, RESPONSES[0]), (1, RESPONSES[1]), (0, RESPONSES[2])]
    data, responses = make_batch(smol_tokenizer(), rows, pairs)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are limited to 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, namespace=f"grape-test-{os.getpid()}",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}, _temp_dir=temp_dir)
    try:
        out = RewardLoopManager(cfg).compute_rm_score(data)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    expected = [expected_reward(r, text.replace("<|im_end|>", "")) for r, text in pairs]
    scores = out.batch["rm_scores"]
    for i, ids in enumerate(responses):  # the reward sits on the last response token
        assert scores[i, len(ids) - 1].item() == pytest.approx(expected[i])
        assert scores[i].sum().item() == pytest.approx(expected[i])
    assert tuple(out.meta_info["reward_extra_keys"]) == KEYS
    assert list(out.non_tensor_batch["format_ok"]) == [1.0, 1.0, 0.0]


# -- failures ------------------------------------------------------------------------------------------------------
def test_outage_raises_a_clear_error(rows: list[dict[str, Any]]) -> None:
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = compose(base_overrides() + reward_overrides("pkg://grape_rewards.adapters.verl", url=dead_url(),
                                                      retries=1))
    fn = get_custom_reward_fn(cfg)
    with pytest.raises(RuntimeError, match="no reward from the service .* after 2 attempts"):
        asyncio.run(fn(data_source="d", solution_str="a dog", ground_truth=rows[0]["reward_model"]["ground_truth"]))


def test_check_without_datasets_names_the_pip_command() -> None:
    """verl's trainer imports HF datasets: without it, the check says which pip command adds it. Run in a fresh
    interpreter with ``datasets`` blocked (in this one, earlier tests may have imported the verl modules that
    import it, and a cached module does not import it again)."""
    require("verl", "hydra")
    code = ("import sys\nsys.modules['datasets'] = None  # an import of datasets fails, as when it is not installed\n"
            "from grape_rewards.adapters.checks import CheckError, compose_verl_config\n"
            "try:\n    compose_verl_config([])\nexcept CheckError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"needs 'datasets'.*pip install 'grape-rewards\[verl\]'", out.stdout), out.stdout


def test_no_backend_and_bad_ground_truth(clean_env: pytest.MonkeyPatch) -> None:
    from grape_rewards.adapters.verl import compute_score

    with pytest.raises(RuntimeError, match="no reward backend configured"):
        asyncio.run(compute_score("d", "a dog", '{"target_ids": ["cap000"]}'))
    with pytest.raises(ValueError, match="grape-rewards: ground_truth: empty label"):
        asyncio.run(compute_score("d", "a dog", "", url="http://127.0.0.1:1"))

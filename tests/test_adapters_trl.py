"""TRL's GRPOTrainer, one optimizer step on CPU (tiny random Llama, SmolLM2 tokenizer), rewarded by the TRL
adapter (sync in-process and async through the real service) on a dataset written by ``grape-rewards prepare``."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_adapters_support import Service, dead_url, demo_scorer, require, smol_tokenizer

from grape_rewards.adapters.trl import make_async_reward_func, make_reward_func
from grape_rewards.prepare import TrainingQuery, label_json, write_training_data

QUERIES = [
    TrainingQuery("zh-frisbee", "一只棕色的狗在阳光明媚的公园里接飞盘", ("cap000",), language="zh"),
    TrainingQuery("vague-tennis", "that sporty moment at the end when they are being polite", ("cap064",),
                  task="longform"),
]
GOOD = "<answer>Two tennis players shake hands over the net after a match.</answer>"


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    with Service() as svc:
        yield svc


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_training_data(QUERIES, tmp_path_factory.mktemp("trl"), formats=["trl"]).files["trl"]


def test_factories_read_labels_and_log_metrics(service: Service) -> None:
    label = label_json(QUERIES[1])
    logged: dict[str, float] = {}
    columns = {"grape_label": [label, label], "query_id": ["q", "q"],
               "log_metric": lambda name, value: logged.__setitem__(name, value)}
    completions = [[{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": "<answer></answer>"}]]
    sync = make_reward_func(url=service.url)
    rewards = sync(prompts=[[], []], completions=completions, **columns)
    assert sync.__name__ == "grape_reward" and rewards[0] == 1.0 and rewards[1] == -1.0
    assert logged["grape/rank"] == pytest.approx((1 + 100) / 2) and logged["grape/format_ok"] == 0.5
    async_fn = make_async_reward_func(url=service.url, name="grape_async")
    assert asyncio.run(async_fn(prompts=[[], []], completions=completions, **columns)) == rewards
    local = make_reward_func(scorer=demo_scorer(), label_column="target_ids")
    assert local(prompts=[""], completions=[GOOD], target_ids=[["cap064"]]) == [1.0]  # plain-text completions
    with pytest.raises(KeyError, match="no label column"):
        sync(prompts=[""], completions=[GOOD], query_id=["q"])


def test_reward_functions_pickle_and_trl_reads_them(service: Service) -> None:
    """Both reward functions survive a pickle round trip (TRL, accelerate and datasets may copy them) and still
    score; TRL's own helpers name them and see which one is async."""
    require("trl")
    from trl.trainer.utils import get_callable_name, is_async_callable

    columns = {"grape_label": [label_json(QUERIES[1])]}
    for fn in (make_reward_func(url=service.url, name="grape_sync"),
               make_async_reward_func(url=service.url, name="grape_async"),
               make_reward_func(index="/nowhere/loaded/lazily", name="grape_local")):
        copy = pickle.loads(pickle.dumps(fn))
        assert get_callable_name(copy) == fn.__name__ and copy.settings == fn.settings
        assert is_async_callable(copy) == (fn.__name__ == "grape_async")
        if fn.settings.mode == "service":
            out = copy(prompts=[""], completions=[GOOD], **columns)
            assert (asyncio.run(out) if is_async_callable(copy) else out) == [1.0]


def test_label_errors_name_the_sample() -> None:
    """A label that does not parse is named by its row in the batch (TRL passes the whole batch)."""
    fn = make_reward_func(index="/nowhere/loaded/lazily")
    columns = {"grape_label": [label_json(QUERIES[1]), label_json(QUERIES[1]), ""]}
    with pytest.raises(ValueError, match=r"labels\[2\]: "):
        fn.items([GOOD] * 3, columns)


def test_outage_is_a_clear_error() -> None:
    fn = make_async_reward_func(url=dead_url(), retries=0)
    with pytest.raises(RuntimeError, match="no reward from the service .* after 1 attempts"):
        asyncio.run(fn(prompts=[""], completions=[GOOD], grape_label=[label_json(QUERIES[1])]))


@pytest.mark.slow
def test_grpo_trainer_one_step(tmp_path: Path, service: Service, train_file: str) -> None:
    require("trl", "datasets")
    import torch
    from datasets import load_dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tok = smol_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    dataset = load_dataset("json", data_files=train_file)["train"]
    seen: list[Any] = []
    local = make_reward_func(scorer=demo_scorer(), name="grape_local")

    def spy(prompts: Any, completions: Any, **columns: Any) -> list[float]:
        seen.append(columns)
        return local(prompts, completions, **columns)

    spy.__name__ = "grape_local"
    remote = make_async_reward_func(url=service.url, name="grape_service")
    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, max_steps=1, learning_rate=1e-5, beta=0.0,
                      report_to="none", logging_steps=1, save_strategy="no", bf16=False, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[spy, remote], args=args, train_dataset=dataset,
                          processing_class=tok)
    assert trainer.train().global_step == 1
    assert set(seen[0]["query_id"]) <= {"zh-frisbee", "vague-tennis"} and len(seen[0]["grape_label"]) == 4
    logs = trainer.state.log_history[0]
    assert "rewards/grape_local/mean" in logs and "rewards/grape_service/mean" in logs
    assert logs["rewards/grape_local/mean"] == pytest.approx(logs["rewards/grape_service/mean"])  # same reward
    assert "grape/rank" in logs and "grape/recall_at_1" in logs

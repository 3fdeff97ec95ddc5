"""OpenRLHF 0.11.2's own reward-calling code (``openrlhf/utils/agent.py::SingleTurnAgentExecutor``, with a stub
vLLM engine) against the real reward service (HTTP mode) and the path-loaded reward file (``.py`` mode, service
and in-process); the answers pushed through OpenRLHF's samples generator into Experience and group_norm."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import types
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_adapters_support import (
    Service,
    clear_grape_env,
    dead_url,
    demo_index_dir,
    require,
    smol_tokenizer,
)

from grape_rewards.adapters import _common
from grape_rewards.adapters.cli import adapter_file
from grape_rewards.adapters.openrlhf import reward_func
from grape_rewards.prepare import TrainingQuery, openrlhf_row

QUERY = TrainingQuery("zh-frisbee", "一只棕色的狗在阳光明媚的公园里接飞盘", ("cap000",), language="zh")
GOOD = "<answer>A brown dog catching a frisbee in a sunny park.</answer><|im_end|>"
VAGUE = "<answer>A dog catching a frisbee on the beach.</answer><|im_end|>"
EMPTY = "<answer></answer><|im_end|>"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No GRAPE_* adapter setting leaks in from the environment."""
    return clear_grape_env(monkeypatch)


class StubEngine:
    """Stands in for OpenRLHF's RolloutRayActor: ``generate`` returns a vLLM-shaped output of a fixed response."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.text = text

    async def generate(self, prompt_token_ids: list[int], sampling_params: Any, multi_modal_data: Any = None) -> Any:
        out = SimpleNamespace(token_ids=list(self.ids), text=self.text, finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


@pytest.fixture(scope="module")
def tok() -> Any:
    require("openrlhf")
    return smol_tokenizer()


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    with Service() as svc:
        yield svc


def prompt_and_label(tok: Any) -> tuple[str, str]:
    """What OpenRLHF's PromptDataset yields for a prepared row: the templated prompt and the label string."""
    row = openrlhf_row(QUERY)
    return tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True), row["label"]


async def run_executor(executor: Any, tok: Any, responses: list[str]) -> list[dict[str, Any]]:
    """One concurrent ``execute`` per response, as a vLLM engine actor runs the samples of a prompt."""
    prompt, label = prompt_and_label(tok)
    params = SimpleNamespace(max_tokens=64, logprobs=None)
    return await asyncio.gather(*(executor.execute(prompt, label, params, max_length=2048, hf_tokenizer=tok,
                                                   llm_engine=StubEngine(tok, r)) for r in responses))


def executor(url_or_path: str) -> Any:
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    return SingleTurnAgentExecutor(url_or_path.split(","))  # what train_ppo_ray does with --reward.remote_url


def reward_of(out: dict[str, Any]) -> float:
    value = out["reward"]
    assert value is not None, "OpenRLHF swallowed a reward error"
    return float(torch.as_tensor(value).flatten()[0])


@pytest.fixture
def samples_generator(monkeypatch: pytest.MonkeyPatch) -> Any:
    """OpenRLHF's real samples_generator module, with vllm and the vLLM actor module stubbed."""
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = lambda **kw: SimpleNamespace(**kw)  # type: ignore[attr-defined]
    engine = types.ModuleType("openrlhf.trainer.ray.vllm_engine")
    engine.batch_vllm_engine_call = engine.create_vllm_engines = lambda *a, **k: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "openrlhf.trainer.ray.vllm_engine", engine)
    monkeypatch.delitem(sys.modules, "openrlhf.trainer.ppo_utils.samples_generator", raising=False)
    import importlib

    return importlib.import_module("openrlhf.trainer.ppo_utils.samples_generator")


def group_advantages(samples_generator: Any, tok: Any, outs: list[dict[str, Any]]) -> torch.Tensor:
    """OpenRLHF's path from executor outputs to Experience, then group_norm over the group."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    gen = samples_generator.SamplesGenerator.__new__(samples_generator.SamplesGenerator)
    exps = [gen._process_response_into_experience(o, max_len=2048) for o in outs]
    assert {"reward", "score", "rank", "recall_at_1", "inflation_gap"} <= set(exps[0].info)
    batch = Experience.concat_experiences(exps, tok.pad_token_id)
    r = batch.rewards.reshape(-1, len(outs)).float()
    return (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-9)


# -- HTTP mode: --reward.remote_url http://HOST:PORT/get_reward ---------------------------------------------------
@pytest.mark.slow
def test_http_mode_against_the_service(tok: Any, service: Service, samples_generator: Any) -> None:
    outs = asyncio.run(run_executor(executor(service.url + "/get_reward"), tok, [GOOD, VAGUE, EMPTY, GOOD]))
    rewards = [reward_of(o) for o in outs]
    assert rewards[0] == rewards[3] == 1.0  # the right caption ranks first: log shape 1/log2(2) = 1
    assert 0.0 < rewards[1] < 1.0 and rewards[2] == -1.0  # vague: lower; empty answer: invalid_reward
    assert outs[0]["scores"] == [1.0] and outs[2]["scores"] == [0.0]
    assert outs[0]["extra_logs"]["rank"] == [1.0] and outs[0]["extra_logs"]["recall_at_1"] == [1.0]
    adv = group_advantages(samples_generator, tok, outs)
    assert adv[0, 0] > adv[0, 1] > adv[0, 2] and torch.isclose(adv.sum(), torch.tensor(0.0), atol=1e-5)


# -- .py mode: --reward.remote_url $(grape-rewards adapters path openrlhf) ---------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["service", "in_process"])
def test_py_mode_file_adapter(tok: Any, service: Service, samples_generator: Any, clean_env: pytest.MonkeyPatch,
                              backend: str) -> None:
    if backend == "service":
        clean_env.setenv("GRAPE_REWARD_URL", service.url)
    else:
        clean_env.setenv("GRAPE_INDEX", demo_index_dir())
        clean_env.setenv("GRAPE_DEVICE", "cpu")
    ex = executor(str(adapter_file("openrlhf")))
    assert ex.reward_func is not None and ex.reward_func.__name__ == "reward_func"
    outs = asyncio.run(run_executor(ex, tok, [GOOD, VAGUE, EMPTY, GOOD]))
    assert all(isinstance(o["reward"], torch.Tensor) and o["reward"].shape == (1,) for o in outs)
    http = asyncio.run(run_executor(executor(service.url + "/get_reward"), tok, [GOOD, VAGUE, EMPTY, GOOD]))
    assert [reward_of(o) for o in outs] == pytest.approx([reward_of(o) for o in http])  # same numbers as HTTP
    assert float(outs[1]["extra_logs"]["rank"][0]) == http[1]["extra_logs"]["rank"][0]
    adv = group_advantages(samples_generator, tok, outs)
    assert adv[0, 0] > adv[0, 1] > adv[0, 2]


@pytest.mark.slow
def test_in_process_mode_batches_concurrent_threads(tok: Any, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GRAPE_INDEX", demo_index_dir())
    clean_env.setenv("GRAPE_DEVICE", "cpu")
    prompt, label = prompt_and_label(tok)
    expected = reward_func([prompt + VAGUE], [prompt], [label])["rewards"].item()
    local = _common.in_process(_common.resolve_settings({}))
    local.batcher.batch_sizes.clear()
    results: list[float] = []
    barrier = threading.Barrier(16)

    def call(i: int) -> None:
        barrier.wait()
        response = f"<answer>Two tennis players, take {i}.</answer>" if i % 2 else VAGUE
        results.append(reward_func([prompt + response], [prompt], [label])["rewards"].item())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 16 and results.count(expected) >= 8
    assert sum(local.batcher.batch_sizes) == 16 and max(local.batcher.batch_sizes) > 1  # threads shared batches


def test_outage_is_retried_then_a_clear_error(tok: Any, clean_env: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    clean_env.setenv("GRAPE_REWARD_URL", dead_url())
    clean_env.setenv("GRAPE_REWARD_RETRIES", "1")
    prompt, label = prompt_and_label(tok)
    with caplog.at_level(logging.ERROR, logger="grape_rewards.adapters"):
        with pytest.raises(RuntimeError, match=r"no reward from the service .* after 2 attempts.*grape-rewards serve"):
            reward_func([prompt + GOOD], [prompt], [label])
    assert any("no reward from the service" in r.getMessage() for r in caplog.records)  # visible: ERROR, not INFO


def test_bad_labels_and_no_backend_raise(tok: Any, clean_env: pytest.MonkeyPatch) -> None:
    prompt, _ = prompt_and_label(tok)
    with pytest.raises(RuntimeError, match="no reward backend configured"):
        reward_func([prompt + GOOD], [prompt], ['{"target_ids": ["cap000"]}'])
    clean_env.setenv("GRAPE_INDEX", demo_index_dir())
    clean_env.setenv("GRAPE_DEVICE", "cpu")
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        reward_func([prompt + GOOD], [prompt], [""])  # --data.label_key not set: OpenRLHF sends ""
    with pytest.raises(ValueError, match="nope"):
        reward_func([prompt + GOOD], [prompt], [json.dumps({"target_ids": ["nope"]})])


def test_in_process_label_errors_name_the_sample(tok: Any, clean_env: pytest.MonkeyPatch) -> None:
    """A bad label is named by its position in the call and, since OpenRLHF calls with one sample at a time
    (always position 0), by its query_id."""
    from grape_rewards.adapters.openrlhf import reward_lists

    clean_env.setenv("GRAPE_INDEX", demo_index_dir())
    clean_env.setenv("GRAPE_DEVICE", "cpu")
    prompt, label = prompt_and_label(tok)
    bad = json.dumps({"target_ids": ["nope"], "query_id": "q-7"})
    with pytest.raises(ValueError, match=r"labels\[2\] \(query_id 'q-7'\): .*'nope'"):
        reward_lists([prompt + GOOD] * 3, [prompt] * 3, [label, label, bad])
    with pytest.raises(ValueError, match=r"labels\[0\] \(query_id 'q-7'\)"):
        reward_func([prompt + GOOD], [prompt], [bad])


@pytest.mark.slow
def test_service_refusal_is_not_retried(tok: Any, service: Service, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GRAPE_REWARD_URL", service.url)
    prompt, _ = prompt_and_label(tok)
    with pytest.raises(RuntimeError, match="refused the sample.*nope"):
        reward_func([prompt + GOOD], [prompt], [json.dumps({"target_ids": ["nope"]})])

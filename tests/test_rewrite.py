"""``grape-rewards rewrite``: prompt templates, the resumable JSONL store, the transformers backend on a tiny
random Llama (and a tiny random Llava for CIRR images), and the OpenAI-compatible backend against a stub server."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from test_eval import write_cirr_release, write_flickr_release

from grape_rewards.cli import main
from grape_rewards.datasets import Query, load_benchmark
from grape_rewards.rewrite import (
    TASK_PROMPTS,
    GenerationRequest,
    Generator,
    OpenAIGenerator,
    RewriteFileError,
    RewriteWriter,
    SamplingConfig,
    TransformersGenerator,
    build_messages,
    generate_rewrites,
    merge_system_message,
    openai_messages,
    read_rewrites,
    trim_partial_line,
)

# --------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("task", ["multilingual", "longform", "composed", "text"])
def test_prompts_ask_for_answer_tags(task: str) -> None:
    messages = build_messages(task, "  some query  ", language="ja")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "<answer>" in messages[0]["content"] and "</answer>" in messages[0]["content"]
    assert isinstance(messages[1]["content"], str) and messages[1]["content"].endswith("some query")
    assert messages[0]["content"] == TASK_PROMPTS[task].system


def test_prompt_details() -> None:
    assert "Japanese" in build_messages("multilingual", "犬", language="ja")[1]["content"]
    assert "77 tokens" in build_messages("longform", "x")[0]["content"]
    with_image = build_messages("composed", "make it red", with_image=True)[1]["content"]
    assert with_image[0] == {"type": "image"} and with_image[1]["type"] == "text"
    assert "Reference image above" in with_image[1]["text"] and "make it red" in with_image[1]["text"]
    assert "not shown" in build_messages("composed", "make it red")[1]["content"]
    merged = merge_system_message(build_messages("composed", "make it red", with_image=True))
    assert len(merged) == 1 and merged[0]["content"][0] == {"type": "image"}
    assert merged[0]["content"][1]["text"].startswith(TASK_PROMPTS["composed"].system)
    with pytest.raises(ValueError, match="empty"):
        build_messages("longform", "   ")


def test_text_task_prompt_is_for_a_text_retriever() -> None:
    system, user = (m["content"] for m in build_messages("text", "那个体育比赛结束时礼貌的时刻", language="zh"))
    assert "text retriever" in system and "passage" in system
    assert "image" not in system.replace("<answer>", "") and "CLIP" not in system
    assert user == "Query (Chinese):\n那个体育比赛结束时礼貌的时刻"
    assert build_messages("text", "a dog")[1]["content"] == "Query (the original language):\na dog"


def test_openai_messages_embed_the_image(tmp_path: Path) -> None:
    (tmp_path / "r.png").write_bytes(b"\x89PNG fake")
    request = GenerationRequest(build_messages("composed", "m", with_image=True), image=str(tmp_path / "r.png"))
    content = openai_messages(request)[1]["content"]
    assert content[0]["type"] == "image_url"
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == b"\x89PNG fake"
    assert content[1]["type"] == "text"


# ----------------------------------------------------------------------------------------------- store


def row(qid: str, rewrite: str = "r") -> dict[str, str]:
    return {"query_id": qid, "rewrite": rewrite, "raw": f"<answer>{rewrite}</answer>", "model": "m"}


def test_store_trims_partial_lines_and_names_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "rw.jsonl"
    with RewriteWriter(path) as w:
        assert w.write_batch([row("1"), row("2")]) == 2
        assert w.write_batch([row("2"), row("3")]) == 1  # 2 is done already
    full = path.read_bytes()
    path.write_bytes(full + b'{"query_id": "4", "rewr')
    assert set(read_rewrites(path)) == {"1", "2", "3"}  # reading ignores the partial line
    assert trim_partial_line(path) == len(b'{"query_id": "4", "rewr') and path.read_bytes() == full
    assert trim_partial_line(path) == 0
    path.write_bytes(full + b"not json\n")
    with pytest.raises(RewriteFileError, match="line 4"):
        read_rewrites(path)
    path.write_bytes(full + json.dumps(row("1")).encode() + b"\n")
    with pytest.raises(RewriteFileError, match="appears twice"):
        read_rewrites(path)
    assert list(read_rewrites(path, allow_duplicates=True)) == ["1", "2", "3"]
    path.write_text(json.dumps({"query_id": "1"}) + "\n")
    with pytest.raises(RewriteFileError, match="'rewrite' must be a string"):
        read_rewrites(path)


class ScriptedGenerator(Generator):
    """Answers ``<answer>rewrite of <query></answer>``; raises on call number ``fail_on`` (1-based)."""

    model_name = "scripted"

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls = 0
        self.fail_on = fail_on
        self.seen: list[GenerationRequest] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("boom")
        self.seen.extend(requests)
        return [f"<answer>rewrite of {r.messages[1]['content'].splitlines()[-1]}</answer>" for r in requests]


def test_generate_rewrites_resumes_after_a_crash(tmp_path: Path) -> None:
    queries = [Query(query_id=str(i), text=f"q{i}", target_ids=("a",), language="zh") for i in range(10)]
    out = tmp_path / "rw.jsonl"
    with pytest.raises(RuntimeError, match="boom"):
        generate_rewrites(queries, ScriptedGenerator(fail_on=3), out, batch_size=3, progress=False)
    first = out.read_text().splitlines()
    assert [json.loads(line)["query_id"] for line in first] == [str(i) for i in range(6)]  # two whole batches
    with open(out, "a") as f:
        f.write('{"query_id": "6", "rewrite": "half')  # the crash also left a partial line
    generator = ScriptedGenerator()
    summary = generate_rewrites(queries, generator, out, batch_size=3, progress=False)
    assert (summary.total, summary.already_done, summary.written, summary.unusable) == (10, 6, 4, 0)
    assert generator.seen[0].messages[1]["content"].endswith("q6")  # the first query not yet written
    lines = out.read_text().splitlines()
    assert lines[:6] == first
    rows = [json.loads(line) for line in lines]
    assert [r["query_id"] for r in rows] == [str(i) for i in range(10)]
    assert rows[7] == {"query_id": "7", "rewrite": "rewrite of q7", "raw": "<answer>rewrite of q7</answer>",
                       "model": "scripted"}
    again = generate_rewrites(queries, ScriptedGenerator(fail_on=1), out, batch_size=3, progress=False)
    assert again.written == 0 and again.already_done == 10  # nothing left: the generator is never called


# ---------------------------------------------------------------------------------- tiny local models

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")
"""A ChatML-like template that renders image parts as ``<image>`` (what the Llava processor expands)."""


def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer trained here on the prompt texts, with a chat template (works offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<answer>", "</answer>"]
    texts = [p.system for p in TASK_PROMPTS.values()] + ["a dog runs on the grass", "a red car"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                       bos_token_id=2, eos_token_id=3)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LlamaForCausalLM + the tiny tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llava (CLIP vision tower, 16 px images, Llama text model) + its processor."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = tmp_path_factory.mktemp("tiny_vlm")
    tokenizer = tiny_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8, image_token="<image>",
                   vision_feature_select_strategy="full", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(path)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8),
        text_config=tiny_llama_config(len(tokenizer)), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_transformers_generator_uses_the_chat_template_and_left_padding(tiny_lm_dir: Path) -> None:
    generator = TransformersGenerator(str(tiny_lm_dir), device="cpu", sampling=SamplingConfig(max_new_tokens=4))
    assert generator.has_chat_template and generator.tokenizer.padding_side == "left"
    prompt = generator.prompt_text(build_messages("longform", "a long passage"))
    assert prompt.startswith("<s>system: ") and prompt.endswith("<s>assistant: ")
    requests = [GenerationRequest(build_messages("longform", text)) for text in ("short", "a much longer passage " * 5)]
    out = generator.generate(requests)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    # Decoding stops at the end of sequence and keeps special answer tags (special tokens in this tokenizer).
    tok = generator.tokenizer
    ids = tok.convert_tokens_to_ids(["<answer>", "a", "dog", "</answer>", "</s>", "red"])
    assert generator.decode(ids) == "<answer> a dog </answer>"
    image_request = GenerationRequest(build_messages("composed", "x", with_image=True), image="/nonexistent.png")
    with pytest.raises(ValueError, match="text-only"):
        generator.generate([image_request])


@pytest.mark.slow
def test_rewrite_cli_transformers_is_resumable(tmp_path: Path, tiny_lm_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "flickr"
    write_flickr_release(root)
    ids = [q.query_id for q in load_benchmark("flickr30k-cn", root, "test").queries()]
    out = tmp_path / "rw.jsonl"
    args = ["rewrite", "--benchmark", "flickr30k-cn", "--root", str(root), "--backend", "transformers",
            "--model", str(tiny_lm_dir), "--model-name", "tiny-llama", "--device", "cpu", "--batch-size", "4",
            "--max-new-tokens", "6", "--out", str(out), "--quiet"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"] == len(ids) == 10 and summary["written"] == 10
    rows = read_rows(out)
    assert [r["query_id"] for r in rows] == ids
    assert all(set(r) == {"query_id", "rewrite", "raw", "model"} and r["model"] == "tiny-llama" for r in rows)

    # A crash mid-write: keep 5 whole lines and half of the 6th; the rerun redoes only the rest.
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2], encoding="utf-8")
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["already_done"] == 5 and summary["written"] == 5
    again = read_rows(out)
    assert sorted(r["query_id"] for r in again) == sorted(ids) and len(again) == len(ids)
    assert again[:5] == rows[:5]
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["written"] == 0


@pytest.mark.slow
def test_rewrite_cli_vlm_gets_the_cirr_reference_image(tmp_path: Path, tiny_vlm_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cirr"
    write_cirr_release(root, "val", n_queries=3)
    out = tmp_path / "rw.jsonl"
    assert main(["rewrite", "--benchmark", "cirr", "--root", str(root), "--model", str(tiny_vlm_dir), "--device",
                 "cpu", "--max-new-tokens", "4", "--out", str(out), "--quiet"]) == 0
    assert [r["query_id"] for r in read_rows(out)] == ["100", "101", "102"]
    # --images on a task without reference images is refused.
    capsys.readouterr()
    assert main(["rewrite", "--benchmark", "flickr30k-cn", "--root", str(root), "--model", str(tiny_vlm_dir),
                 "--images", "--out", str(tmp_path / "x.jsonl"), "--quiet"]) == 2
    assert "have no reference image" in capsys.readouterr().err


# ------------------------------------------------------------------------------ OpenAI-compatible backend


class StubServer:
    """A FastAPI ``/v1/chat/completions`` on a free loopback port, in a thread; records every request."""

    def __init__(self, fail_first: int = 0, status: int = 503, delay: float = 0.02) -> None:
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_first = fail_first
        self.status = status
        self.delay = delay
        self.calls = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
                body = await request.json()
                if self.calls <= self.fail_first:
                    return JSONResponse({"error": {"message": "overloaded"}}, status_code=self.status)
                self.requests.append({"body": body, "authorization": request.headers.get("authorization")})
                content = body["messages"][-1]["content"]
                text = content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")
                answer = f"target: {text.splitlines()[-1].split(': ', 1)[-1]}"
                return {"id": "x", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant",
                                                 "content": f"<think>easy</think><answer>{answer}</answer>"}}]}
            finally:
                self.in_flight -= 1

        return app

    def __enter__(self) -> StubServer:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app(), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("stub server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


@pytest.mark.slow
def test_rewrite_cli_openai_backend_sends_cirr_images(tmp_path: Path, stub: StubServer,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cirr"
    records = write_cirr_release(root, "val", n_queries=6)
    out = tmp_path / "rw.jsonl"
    rc = main(["rewrite", "--benchmark", "cirr", "--root", str(root), "--backend", "openai", "--base-url", stub.url,
               "--model", "stub-vl", "--api-key", "sekrit", "--concurrency", "2", "--batch-size", "4",
               "--temperature", "0.7", "--max-new-tokens", "32", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rows = read_rows(out)
    assert [r["query_id"] for r in rows] == [str(r["pairid"]) for r in records]
    assert rows[0]["rewrite"] == f"target: {records[0]['caption']}" and rows[0]["model"] == "stub-vl"
    assert rows[0]["raw"].startswith("<think>easy</think><answer>")
    assert len(stub.requests) == 6 and 1 <= stub.max_in_flight <= 2
    for request in stub.requests:
        body = request["body"]
        assert request["authorization"] == "Bearer sekrit"
        assert body["model"] == "stub-vl" and body["max_tokens"] == 32 and body["temperature"] == 0.7
        assert body["messages"][0]["role"] == "system"
        image, text = body["messages"][1]["content"]
        caption = text["text"].split("Modification: ", 1)[1]
        record = next(r for r in records if r["caption"] == caption)
        image_file = root / "img_raw" / "dev" / f"{record['reference']}.png"
        expected = "data:image/png;base64," + base64.b64encode(image_file.read_bytes()).decode()
        assert image["image_url"]["url"] == expected


@pytest.mark.slow
def test_openai_generator_retries_and_reports_errors() -> None:
    requests = [GenerationRequest(build_messages("longform", f"passage {i}")) for i in range(3)]
    with StubServer(fail_first=2, status=503) as server:
        generator = OpenAIGenerator(server.url, "m", concurrency=1, retry_delay=0.01)
        assert generator.generate(requests) == [f"<think>easy</think><answer>target: passage {i}</answer>"
                                                for i in range(3)]
        assert server.calls == 5
    with StubServer(fail_first=10, status=400) as server:
        with pytest.raises(RuntimeError, match="HTTP 400"):
            OpenAIGenerator(server.url, "m", retry_delay=0.01).generate(requests[:1])
        assert server.calls == 1  # a client error is not retried
    with StubServer(fail_first=10, status=500) as server:
        with pytest.raises(RuntimeError, match="HTTP 500"):
            OpenAIGenerator(server.url, "m", max_retries=2, retry_delay=0.01).generate(requests[:1])
        assert server.calls == 3
    with pytest.raises(RuntimeError, match="failed after 1 tries"):
        OpenAIGenerator("http://127.0.0.1:9/v1", "m", max_retries=0).generate(requests[:1])

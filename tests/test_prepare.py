"""``grape-rewards prepare``: the rows of each framework, and the written files loaded by the frameworks' own
dataset code (OpenRLHF's blending_datasets + PromptDataset, verl's RLHFDataset, HF datasets for TRL)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_adapters_support import require, smol_tokenizer, vlm_tokenizer

from grape_rewards.cli import main
from grape_rewards.datasets.schema import DataFormatError
from grape_rewards.labels import parse_label
from grape_rewards.prepare import (
    TrainingQuery,
    chat_messages,
    label,
    openrlhf_row,
    read_queries_jsonl,
    trl_row,
    verl_row,
)

IMAGES = [f"train-{i}-0-img{i % 2}" for i in range(6)]


def write_cirr_train(root: Path, hide_targets: bool = False) -> None:
    """A tiny CIRR release (train split): 6 images, 2 queries."""
    from PIL import Image

    (root / "image_splits").mkdir(parents=True)
    (root / "captions").mkdir(parents=True)
    (root / "image_splits" / "split.rc2.train.json").write_text(
        json.dumps({n: f"./train/{i % 2}/{n}.png" for i, n in enumerate(IMAGES)}))
    records = []
    for pairid, (ref, tgt, cap) in enumerate([(0, 1, "make the dog smaller"), (2, 3, "add a second cat")]):
        rec: dict[str, Any] = {"pairid": pairid, "reference": IMAGES[ref], "caption": cap,
                               "img_set": {"id": pairid, "members": IMAGES[:6]}}
        if not hide_targets:
            rec["target_hard"] = IMAGES[tgt]
        records.append(rec)
    (root / "captions" / "cap.rc2.train.json").write_text(json.dumps(records))
    for i, n in enumerate(IMAGES):
        path = root / "img_raw" / "train" / str(i % 2) / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(path)


@pytest.fixture(scope="module")
def cirr_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cirr")
    write_cirr_train(root)
    out = root / "prepared"
    assert main(["prepare", "--benchmark", "cirr", "--root", str(root), "--split", "train", "--out", str(out)]) == 0
    return out


ZH_QUERIES = [
    {"query_id": "q0", "text": "一只棕色的狗在公园里接飞盘", "target_ids": ["cap000"], "split": "train"},
    {"query_id": "q1", "text": "一位服务员在晚宴上倒酒", "target_ids": ["cap038"], "split": "train"},
    {"query_id": "q2", "text": "测试集查询", "target_ids": [], "split": "train"},
    {"query_id": "q3", "text": "验证集", "target_ids": ["cap001"], "split": "val"},
]


@pytest.fixture(scope="module")
def zh_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("zh")
    src = folder / "queries.jsonl"
    src.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in ZH_QUERIES), encoding="utf-8")
    out = folder / "prepared"
    assert main(["prepare", "--queries", str(src), "--task", "multilingual", "--language", "zh", "--out",
                 str(out)]) == 0
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- rows ------------------------------------------------------------------------------------------------------
def test_rows_carry_the_prompt_template_and_the_label() -> None:
    q = TrainingQuery("7", "make the dog smaller", ("img_1",), task="composed", reference_id="img_0",
                      reference_image="/data/img_0.png", split="train")
    assert label(q) == {"target_ids": ["img_1"], "reference_id": "img_0", "query_id": "7",
                        "original_query": "make the dog smaller"}
    messages = chat_messages(q, with_image=True)
    assert [m["role"] for m in messages] == ["system", "user"] and "<answer>" in messages[0]["content"]
    assert messages[1]["content"].startswith("<image>") and messages[1]["content"].count("<image>") == 1
    assert "make the dog smaller" in messages[1]["content"]
    assert "<image>" not in chat_messages(q)[1]["content"]  # text-only prompt: the image is described as absent
    merged = chat_messages(q, with_image=True, system=False)
    assert len(merged) == 1 and merged[0]["content"].count("<image>") == 1

    row = openrlhf_row(q, with_image=True, data_source="grape_cirr")
    assert row["images"] == ["/data/img_0.png"] and parse_label(row["label"]).reference_id == "img_0"
    v = verl_row(q, 3, with_image=True, data_source="grape_cirr")
    assert v["data_source"] == "grape_cirr" and v["ability"] == "query_rewrite" and v["images"] == ["/data/img_0.png"]
    assert v["reward_model"] == {"style": "rule", "ground_truth": row["label"]}
    assert v["extra_info"] == {"index": 3, "split": "train", "query_id": "7", "task": "composed", "language": ""}
    t = trl_row(q, with_image=True)  # TRL puts the row's images before the first user text itself
    assert t["prompt"][1]["content"].startswith("Reference image above.") and t["images"] == ["/data/img_0.png"]
    assert t["grape_label"] == row["label"] and t["target_ids"] == ["img_1"] and t["query_id"] == "7"


def test_read_queries_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    f = tmp_path / "q.jsonl"
    f.write_text('{"query_id": "a", "text": "x", "target_ids": "t1"}\n{"query_id": "b", "target_ids": []}\n')
    with pytest.raises(DataFormatError, match=r"q.jsonl, line 2: missing 'text'"):
        read_queries_jsonl(f, task="longform")
    f.write_text('{"query_id": "a", "text": "x", "target_ids": "t1"}\n')
    with pytest.raises(DataFormatError, match="pass --task"):
        read_queries_jsonl(f)
    assert read_queries_jsonl(f, task="longform")[0].target_ids == ("t1",)


def test_cli_summary_and_hidden_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_cirr_train(tmp_path / "cirr", hide_targets=False)
    assert main(["prepare", "--benchmark", "cirr", "--root", str(tmp_path / "cirr"), "--split", "train",
                 "--out", str(tmp_path / "o"), "--format", "openrlhf", "--no-images", "--limit", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 1 and summary["with_images"] is False and list(summary["files"]) == ["openrlhf"]
    row = read_jsonl(Path(summary["files"]["openrlhf"]))[0]
    assert "images" not in row and "not shown" in row["prompt"][1]["content"]
    assert main(["prepare", "--benchmark", "cirr", "--root", str(tmp_path / "cirr"), "--out", str(tmp_path / "p"),
                 "--format", "parquet"]) == 2  # unknown format: a clear CLI error
    assert "unknown format" in capsys.readouterr().err


def test_split_filter_and_dropped_queries(zh_out: Path) -> None:
    rows = read_jsonl(zh_out / "openrlhf" / "train.jsonl")
    assert [json.loads(r["label"])["query_id"] for r in rows] == ["q0", "q1"]  # q2 (no target), q3 (val) left out
    assert "Chinese" in rows[0]["prompt"][1]["content"] and "一只棕色的狗" in rows[0]["prompt"][1]["content"]


# -- the frameworks' own dataset code --------------------------------------------------------------------------
def _openrlhf_dataset(path: Path, tokenizer: Any) -> Any:
    require("openrlhf")
    from openrlhf.datasets import PromptDataset
    from openrlhf.datasets.utils import blending_datasets

    data = SimpleNamespace(input_key="prompt", label_key="label", apply_chat_template=True, image_key="images")
    strategy = SimpleNamespace(args=SimpleNamespace(data=data, use_ms=False), print=lambda *a, **k: None,
                               is_rank_0=lambda: False)
    return PromptDataset(blending_datasets(str(path), None, strategy), tokenizer, strategy)


def test_openrlhf_prompt_dataset_loads_vlm_rows(cirr_out: Path) -> None:
    ds = _openrlhf_dataset(cirr_out / "openrlhf" / "train.jsonl", vlm_tokenizer())
    assert len(ds) == 2
    datasource, prompt, label_value, images = ds[0]
    assert datasource == "grape_cirr"
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 1  # '<image>' became an image part
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert parse_label(label_value).target_ids == [IMAGES[1]] and parse_label(label_value).reference_id == IMAGES[0]
    assert len(images) == 1 and Path(images[0]).is_file() and images[0].endswith(f"{IMAGES[0]}.png")


def test_openrlhf_prompt_dataset_loads_text_rows(zh_out: Path) -> None:
    ds = _openrlhf_dataset(zh_out / "openrlhf" / "train.jsonl", smol_tokenizer())
    _, prompt, label_value, images = ds[1]
    assert images is None and "一位服务员" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert parse_label(label_value).target_ids == ["cap038"]


def test_verl_rlhf_dataset_loads_the_parquet(cirr_out: Path, zh_out: Path, tmp_path: Path) -> None:
    require("verl")
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create({"prompt_key": "prompt", "image_key": "images", "max_prompt_length": 1024,
                               "filter_overlong_prompts": False, "cache_dir": str(tmp_path)})
    # images need a processor; verl only uses it for the length filter here (a VLM processor is not on CPU CI)
    ds = RLHFDataset(str(cirr_out / "verl" / "train.parquet"), smol_tokenizer(), config, processor=object())
    row = ds[1]
    user = row["raw_prompt"][1]["content"]
    assert user[0]["type"] == "image" and Path(user[0]["image"]).name == f"{IMAGES[2]}.png"
    assert user[1]["type"] == "text" and "add a second cat" in user[1]["text"]
    assert row["data_source"] == "grape_cirr" and row["index"] == 1
    assert parse_label(row["reward_model"]["ground_truth"]).target_ids == [IMAGES[3]]

    text_config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 1024,
                                    "filter_overlong_prompts": True, "cache_dir": str(tmp_path),
                                    "filter_overlong_prompts_workers": 1})
    ds = RLHFDataset(str(zh_out / "verl" / "train.parquet"), smol_tokenizer(), text_config)
    assert len(ds) == 2  # nothing filtered: the prompts fit
    assert ds[0]["raw_prompt"][1]["content"].startswith("Caption (Chinese):")


def test_trl_dataset_loads(zh_out: Path, cirr_out: Path) -> None:
    require("datasets", "trl")
    from datasets import load_dataset
    from trl.data_utils import is_conversational, maybe_apply_chat_template, prepare_multimodal_messages

    ds = load_dataset("json", data_files=str(zh_out / "trl" / "train.jsonl"))["train"]
    assert is_conversational(ds[0]) and ds[0]["query_id"] == "q0"
    text = maybe_apply_chat_template({"prompt": ds[0]["prompt"]}, smol_tokenizer())["prompt"]
    assert text.endswith("<|im_start|>assistant\n") and "一只棕色的狗" in text
    vlm = load_dataset("json", data_files=str(cirr_out / "trl" / "train.jsonl"))["train"]
    messages = prepare_multimodal_messages(vlm[0]["prompt"], images=vlm[0]["images"])  # what GRPOTrainer does
    assert messages[1]["content"][0] == {"type": "image", "image": vlm[0]["images"][0]}
    assert parse_label(vlm[0]["grape_label"]).reference_id == IMAGES[0]


# -- the text-retrieval task -----------------------------------------------------------------------------------
def tiny_text_index(folder: Path, text_encoder_dir: Path) -> Path:
    """Three captions embedded by the tiny text encoder (an index of a text corpus)."""
    from grape_rewards.corpus import build_index, read_source
    from grape_rewards.retrievers import create_retriever

    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"cap00{i}", "text": t}) + "\n" for i, t in
                              enumerate(["a dog in a park", "a waiter pours wine", "two players shake hands"])))
    retriever = create_retriever(f"text:{text_encoder_dir}", device="cpu")
    build_index(read_source(corpus), retriever, folder / "index", progress=False)
    return folder / "index"


def test_a_text_index_picks_the_text_task(tmp_path: Path, text_encoder_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    index = tiny_text_index(tmp_path, text_encoder_dir)
    src = tmp_path / "queries.jsonl"
    src.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in ZH_QUERIES[:2]), encoding="utf-8")
    out = tmp_path / "prepared"
    assert main(["prepare", "--queries", str(src), "--index", str(index), "--language", "zh", "--format", "trl",
                 "--out", str(out)]) == 0
    rows = read_jsonl(out / "trl" / "train.jsonl")
    assert [r["task"] for r in rows] == ["text", "text"]
    system, user = rows[0]["prompt"][0]["content"], rows[0]["prompt"][1]["content"]
    assert "text retriever" in system and "image" not in system and "CLIP" not in system
    assert user == "Query (Chinese):\n一只棕色的狗在公园里接飞盘"

    # rows that name an image task take the text task on a text corpus; an explicit image --task is refused
    src.write_text(json.dumps({**ZH_QUERIES[0], "task": "multilingual"}, ensure_ascii=False) + "\n")
    assert main(["prepare", "--queries", str(src), "--index", str(index), "--format", "trl", "--out",
                 str(tmp_path / "p2")]) == 0
    assert read_jsonl(tmp_path / "p2" / "trl" / "train.jsonl")[0]["task"] == "text"
    assert main(["prepare", "--queries", str(src), "--index", str(index), "--task", "multilingual", "--out",
                 str(tmp_path / "p3")]) == 2
    assert "--task multilingual does not fit" in capsys.readouterr().err and not (tmp_path / "p3").exists()


def test_a_composed_benchmark_on_a_text_index_is_refused(tmp_path: Path, text_encoder_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``prepare --benchmark cirr`` against an index of a text corpus: CIRR's queries need a reference image."""
    index = tiny_text_index(tmp_path, text_encoder_dir)
    root = tmp_path / "cirr"
    write_cirr_train(root)
    out = tmp_path / "prepared"
    assert main(["prepare", "--benchmark", "cirr", "--root", str(root), "--split", "train", "--index", str(index),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a composed (reference image) query, but the index embeds a text corpus" in err
    assert not out.exists()


def test_the_text_task_is_selectable_without_an_index(tmp_path: Path) -> None:
    src = tmp_path / "queries.jsonl"
    src.write_text(json.dumps(ZH_QUERIES[0], ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["prepare", "--queries", str(src), "--task", "text", "--format", "openrlhf", "--out",
                 str(tmp_path / "p")]) == 0
    row = read_jsonl(tmp_path / "p" / "openrlhf" / "train.jsonl")[0]
    assert "text retriever" in row["prompt"][0]["content"]


def test_tasks_for_modality_refuses_what_the_corpus_cannot_hold() -> None:
    from grape_rewards.prepare.rows import tasks_for_modality

    composed = TrainingQuery("c", "make it blue", ("img_1",), task="composed", reference_id="img_0")
    with pytest.raises(ValueError, match="composed .* text corpus"):
        tasks_for_modality([composed], "text")
    with pytest.raises(ValueError, match="'text' task, but the index embeds images"):
        tasks_for_modality([TrainingQuery("t", "a dog", ("img_1",), task="text")], "image")
    longform = TrainingQuery("l", "a long passage", ("img_1",), task="longform")
    assert tasks_for_modality([longform], "image") == [longform]

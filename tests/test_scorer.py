"""RewardScorer: the one scoring path (extraction, cache, rank, composite), composed retrieval, and the CLI."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

from grape_rewards.alarms import ALARM_KEYS
from grape_rewards.cli import main
from grape_rewards.corpus import CorpusIndex, CorpusIndexError, CorpusSource, build_index, corpus_rank
from grape_rewards.demo import preference, top_candidates
from grape_rewards.retrievers import ComposedRetriever
from grape_rewards.rewards import RewardConfig, sample_keys
from grape_rewards.scorer import ItemError, RewardItem, RewardScorer

CAPTIONS = ["a dog runs on the grass", "a cat sleeps on a sofa", "two men play chess in a park",
            "a red car parked on a street", "children swim in a pool", "a dog sleeps on a sofa"]


@pytest.fixture(scope="module")
def text_index(tmp_path_factory, minilm):
    source = CorpusSource([f"c{i}" for i in range(len(CAPTIONS))], CAPTIONS, "text", "test")
    return build_index(source, minilm, tmp_path_factory.mktemp("scorer") / "idx", progress=False)


def test_scores_match_direct_rank(minilm, text_index):
    scorer = RewardScorer(minilm, text_index, RewardConfig(shape="reciprocal"))
    rewrites = ["a puppy running in a field", "a sleeping kitten", "cars"]
    targets = [["c0"], ["c1"], ["c3", "c4"]]
    out = scorer.score([RewardItem(rewrite=r, target_ids=t) for r, t in zip(rewrites, targets)])
    stats = corpus_rank(minilm.encode_texts(rewrites), text_index.embeddings, [text_index.rows(t) for t in targets])
    for o, rank, n in zip(out, stats.rank.tolist(), stats.n.tolist()):
        assert (o["rank"], o["n"]) == (rank, n)
        assert o["reward"] == pytest.approx(1 / rank)
        assert tuple(o) == (*sample_keys(scorer.config), *ALARM_KEYS) == scorer.keys  # reward keys, alarm flags


def test_completion_extraction_and_format_penalty(minilm, text_index):
    scorer = RewardScorer(minilm, text_index)
    good, empty, missing = scorer.score([
        RewardItem(completion="<think>translate</think><answer>a dog running on grass</answer><|im_end|>",
                   target_ids=["c0"]),
        RewardItem(completion="<answer> </answer><|im_end|>", target_ids=["c0"]),
        RewardItem(completion="<think>never finished", target_ids=["c0"]),
    ])
    assert good["rank"] == 1 and good["format_ok"] == 1.0
    for bad in (empty, missing):
        assert bad["reward"] == scorer.config.format.invalid_reward
        assert bad["rank"] == bad["n"] == len(CAPTIONS) and bad["format_ok"] == 0.0


def test_truncation_is_flagged_not_rejected(minilm, text_index):
    scorer = RewardScorer(minilm, text_index)
    long = "a dog runs on the grass " * 80
    items = [RewardItem(rewrite=long, target_ids=["c0"]), RewardItem(rewrite="a dog runs", target_ids=["c0"])]
    out, short = scorer.score(items)
    assert out["truncated"] == 1.0 and out["num_tokens"] > minilm.max_text_tokens and short["truncated"] == 0.0
    penalised = RewardScorer(minilm, text_index, RewardConfig(format={"truncation_penalty": 0.25}))
    out_p, short_p = penalised.score(items)
    assert out_p["reward"] == pytest.approx(out["reward"] - 0.25) and short_p["reward"] == short["reward"]


def test_exclusions_and_unknown_ids(minilm, text_index):
    scorer = RewardScorer(minilm, text_index)
    base = scorer.score([RewardItem(rewrite="a dog sleeps on a sofa", target_ids=["c1"])])[0]
    excl = scorer.score([RewardItem(rewrite="a dog sleeps on a sofa", target_ids=["c1"], excluded_ids=["c5"])])[0]
    assert excl["rank"] == base["rank"] - 1 and excl["n"] == base["n"] - 1
    with pytest.raises(ItemError, match="items.0.: unknown corpus id 'c99'"):
        scorer.score([RewardItem(rewrite="x", target_ids=["c99"])])


def test_cache_and_relative_mode(minilm, text_index):
    scorer = RewardScorer(minilm, text_index, RewardConfig(relative=True, shape="reciprocal"))
    items = [RewardItem(rewrite="a dog running on the grass", target_ids=["c0"], original_query="狗在草地上"),
             RewardItem(rewrite="  a dog running   on the grass ", target_ids=["c0"], original_query="狗在草地上")]
    first = scorer.score_batch(items)
    # one miss for the rewrite (both spellings normalise to one text), one for the original query
    assert first.timings["cache_misses"] == 2 and first.timings["cache_hits"] == 0
    plain = RewardScorer(minilm, text_index)
    original = plain.score([RewardItem(rewrite="狗在草地上", target_ids=["c0"])])[0]["rank"]
    second = scorer.score_batch(items)
    assert second.timings["cache_misses"] == 0
    for s in first.samples + second.samples:
        assert s["original_rank"] == original
        assert s["reward"] == pytest.approx(1 / s["rank"] - 1 / original)
    with pytest.raises(ValueError, match="needs original_query"):
        scorer.score([RewardItem(rewrite="a dog", target_ids=["c0"])])


def test_thread_safety(minilm, text_index, monkeypatch):
    """Concurrent callers get their own rewards, and the retriever (whose fast tokenizer is not safe to share
    between threads) is never entered by two of them at once: the scorer serialises its batches."""
    scorer = RewardScorer(minilm, text_index)
    texts = [f"a dog number {i} on the grass" for i in range(12)]
    expected = [s["reward"] for s in scorer.score([RewardItem(rewrite=t, target_ids=["c0"]) for t in texts])]
    scorer.embedding_cache = type(scorer.embedding_cache)(0)  # no cache: every call encodes
    inside, overlaps, guard = [0], [0], threading.Lock()
    encode = minilm.encode_texts_with_info

    def watched_encode(*args, **kwargs):
        with guard:
            inside[0] += 1
            overlaps[0] += inside[0] > 1
        try:
            time.sleep(0.005)  # holds the door open: an unserialised second caller would walk in now
            return encode(*args, **kwargs)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(minilm, "encode_texts_with_info", watched_encode)
    got: dict[int, float] = {}
    start = threading.Barrier(len(texts))

    def work(i: int) -> None:
        start.wait()
        got[i] = scorer.score([RewardItem(rewrite=texts[i], target_ids=["c0"])])[0]["reward"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps[0] == 0
    assert [got[i] for i in range(len(texts))] == pytest.approx(expected, abs=1e-6)


def test_mismatched_retriever_is_refused(tiny_open_clip, text_index):
    with pytest.raises(CorpusIndexError, match="mismatched embeddings"):
        RewardScorer(tiny_open_clip, text_index)


def test_composed_reference_fusion(tmp_path, tiny_open_clip, images):
    source = CorpusSource([p.stem for p in images], [str(p) for p in images], "image", "imgs")
    index = build_index(source, tiny_open_clip, tmp_path / "idx", progress=False)
    composed = ComposedRetriever(tiny_open_clip, fusion="sum", image_weight=0.5)
    scorer = RewardScorer(composed, index)
    ref, target = images[0].stem, images[1].stem
    out = scorer.score([RewardItem(rewrite="make it blue", target_ids=[target], reference_id=ref)])[0]
    text = tiny_open_clip.encode_texts(["make it blue"])
    query = torch.nn.functional.normalize(0.5 * text + 0.5 * index.embeddings[index.rows([ref])].float(), dim=1)
    stats = corpus_rank(query, index.embeddings, [index.rows([target])], [index.rows([ref])])
    assert out["rank"] == int(stats.rank[0]) and out["n"] == len(images) - 1
    assert out["target_sim"] == pytest.approx(float(stats.target_sim[0]), abs=1e-5)
    with pytest.raises(ValueError, match="needs a reference_id"):
        scorer.score([RewardItem(rewrite="make it blue", target_ids=[target])])


def test_demo_names_every_rewrite_tied_at_the_top():
    rewrites = ["A brown dog catching a frisbee.", "Dog, frisbee, park, ball.", "A dog on a beach.", "A dog."]
    tie = preference("rank reward", rewrites, [1.0, 1.0, 1.0, 0.43])
    assert tie == ("rank reward: tie at 1.000 between 'A brown dog catching a frisbee.', 'Dog, frisbee, park, "
                   "ball.', 'A dog on a beach.'")
    assert "prefers" not in tie
    assert preference("rank reward", rewrites, [1.0, 0.63, 0.5, 0.43]) == \
        "rank reward prefers: A brown dog catching a frisbee."
    assert top_candidates([0.2, 0.9, 0.9]) == [1, 2]


@pytest.mark.slow
def test_cli_demo_ranks_the_english_rewrite_above_the_chinese_original(capsys, tmp_path, monkeypatch):
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert main(["demo", "--device", "cpu", "--json", str(tmp_path / "demo.json")]) == 0
    assert list(temp.glob("grape*")) == [], "the demo's temporary index was left behind"
    printed = capsys.readouterr().out
    assert "Chinese query" in printed
    rows = json.loads((tmp_path / "demo.json").read_text())
    for query_id in dict.fromkeys(r["query_id"] for r in rows):  # each group's verdict names every tied rewrite
        group = [r for r in rows if r["query_id"] == query_id and r["candidate"] > 0]
        top = [r for r in group if r["rank_reward"] == max(g["rank_reward"] for g in group)]
        expected = preference("log", [r["text"] for r in group], [r["rank_reward"] for r in group])
        assert ("tie at" in expected) == (len(top) > 1) and "   " + expected + "\n" in printed
    zh = [r for r in rows if r["query_id"] == "zh-frisbee"]
    original, english = zh[0], zh[1]
    assert english["rank"] < original["rank"]
    assert english["rank_reward"] > original["rank_reward"]
    assert "score inflation" in printed
    differ = re.search(r"they pick different rewrites in (\d+) of 100 groups; BM25, which neither reward sees, ranks "
                       r"the target higher with log's pick in (\d+) and with similarity's in (\d+)", printed)
    assert differ, printed
    assert int(differ[2]) + int(differ[3]) <= int(differ[1]) <= 100


@pytest.mark.slow
def test_cli_index_and_score(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"c{i}", "text": c}) + "\n" for i, c in enumerate(CAPTIONS)))
    assert main(["index", "build", "--retriever", "text:all-MiniLM-L6-v2", "--device", "cpu", "--source",
                 str(corpus), "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    assert main(["index", "info", str(tmp_path / "idx")]) == 0
    assert '"count": 6' in capsys.readouterr().out
    rewrites = tmp_path / "rewrites.jsonl"
    rewrites.write_text(json.dumps({"completion": "<answer>a puppy on a lawn</answer>", "target_ids": ["c0"],
                                    "query_id": "kept"}) + "\n" + json.dumps({"rewrite": "chess", "target_ids": ["c2"]})
                        + "\n")
    assert main(["score", "--index", str(tmp_path / "idx"), "--input", str(rewrites), "--output",
                 str(tmp_path / "scored.jsonl"), "--shape", "recall@k", "--k", "1", "--quiet"]) == 0
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [s["rank"] for s in scored] == [1.0, 1.0] and scored[0]["query_id"] == "kept"
    assert all(s["reward"] == 1.0 for s in scored)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"rewrite": "x", "target_ids": ["nope"]}) + "\n")
    assert main(["score", "--index", str(tmp_path / "idx"), "--input", str(bad), "--output",
                 str(tmp_path / "out2.jsonl"), "--quiet"]) == 2
    assert "unknown corpus id 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out2.jsonl").exists()
    bad.write_text('{"rewrite": "x"}\n')
    assert main(["score", "--index", str(tmp_path / "idx"), "--input", str(bad), "--output",
                 str(tmp_path / "out2.jsonl"), "--quiet"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_in_memory_index_without_manifest(minilm):
    emb = minilm.encode_texts(CAPTIONS)
    scorer = RewardScorer(minilm, CorpusIndex(emb, [f"c{i}" for i in range(len(CAPTIONS))]))
    assert scorer.score([RewardItem(rewrite=CAPTIONS[3], target_ids=["c3"])])[0]["rank"] == 1


def test_encoded_rows_can_be_modified_without_touching_the_cache(tiny_open_clip):
    import torch

    from grape_rewards.corpus import CorpusIndex
    from grape_rewards.scorer import RewardScorer

    r = tiny_open_clip
    index = CorpusIndex(torch.nn.functional.normalize(torch.randn(5, r.dim), dim=1), [str(i) for i in range(5)],
                        {"retriever": {"fingerprint": r.fingerprint}})
    scorer = RewardScorer(r, index, cache_size=10)
    first, _ = scorer.encode(["a dog", "a cat"])
    want = first.clone()
    first.zero_()  # Retriever.encode_* promise: callers may modify the result in place
    again, _ = scorer.encode(["a dog", "a cat"])
    assert scorer.embedding_cache.hits == 2 and torch.equal(again, want)


OFFLINE_BAD_ROWS = [
    ("unknown key instead of the text", {"text": "a dog", "target_ids": ["c0"]},
     ".text: Extra inputs are not permitted"),
    ("no text", {"target_ids": ["c0"]}, ": give 'completion' (the model's response) or 'rewrite'"),
    ("no target", {"rewrite": "a dog"}, ".target_ids: Field required"),
    ("wrong type", {"rewrite": 5, "target_ids": ["c0"]}, ".rewrite: Input should be a valid string"),
    ("unknown target id", {"rewrite": "a dog", "target_ids": ["c99"]}, ": unknown corpus id 'c99'"),
    ("relative mode without original_query", {"rewrite": "a dog", "target_ids": ["c0"]},
     ": the relative reward mode needs original_query"),
]


@pytest.mark.parametrize(("name", "row", "problem"), OFFLINE_BAD_ROWS, ids=[r[0] for r in OFFLINE_BAD_ROWS])
def test_offline_scoring_refuses_what_the_service_refuses(minilm, text_index, tmp_path, name, row, problem):
    """`grape-rewards score` refuses a row with its file:line and the very message the service gives the same item
    in /v1/rewards; nothing is written, and an output file already there is left as it was."""
    from grape_rewards.scoring_io import score_jsonl
    from grape_rewards.server.app import validated
    from grape_rewards.server.protocol import RequestError, parse_native

    config = RewardConfig(relative=name.startswith("relative"))
    scorer = RewardScorer(minilm, text_index, config)
    rewrites = tmp_path / "rewrites.jsonl"
    good = {"rewrite": "a dog", "target_ids": ["c0"], "original_query": "狗"}
    rewrites.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
    output = tmp_path / "scored.jsonl"
    output.write_text("earlier results\n")
    with pytest.raises(ValueError) as offline:
        score_jsonl(rewrites, output, scorer, progress=False)
    assert str(offline.value).startswith(f"{rewrites}:3: row{problem}")
    assert output.read_text() == "earlier results\n"
    with pytest.raises(RequestError) as service:
        items = parse_native({"items": [row]}, max_items=10)
        validated(scorer, items, "items[{}]")
    assert service.value.status == 422
    assert service.value.message.removeprefix("items[0]") == str(offline.value).removeprefix(f"{rewrites}:3: row")


def test_offline_scoring_names_a_csv_and_takes_a_bare_target_id(minilm, text_index, tmp_path):
    from grape_rewards.scoring_io import score_jsonl

    scorer = RewardScorer(minilm, text_index)
    csv = tmp_path / "rewrites.csv"
    csv.write_text("rewrite,target_ids\na dog runs on the grass,c0\n")
    with pytest.raises(ValueError, match=r"rewrites.csv:1: invalid JSON .*looks like a CSV file: --input takes JSON"):
        score_jsonl(csv, tmp_path / "out.jsonl", scorer, progress=False)
    assert not (tmp_path / "out.jsonl").exists()
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"rewrite": "a dog runs on the grass", "target_ids": "c0", "query_id": "q1"}) + "\n")
    summary = score_jsonl(bare, tmp_path / "out.jsonl", scorer, progress=False)
    scored = json.loads((tmp_path / "out.jsonl").read_text())
    assert summary["count"] == 1.0 and scored["rank"] == 1.0 and scored["query_id"] == "q1"
    assert scored["target_ids"] == "c0"  # the input row is passed through as given

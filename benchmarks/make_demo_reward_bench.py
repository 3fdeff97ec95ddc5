"""Write the demo's reward benchmark file, ``grape_rewards/demo/data/reward_bench.jsonl`` (shipped in the package).

For each of the 100 demo captions: a shifted query (the caption buried in chatter, or misspelt), 8 rewrites sampled
from SmolLM2-135M-Instruct (the prompt of ``reward_bench.py``, no example to copy), and four adversarial candidates:
the query copied, a keyword list stuffed with the words of the nearest other caption, generic boilerplate, and the
nearest other caption itself (a hard negative). ``grape-rewards reward-bench --demo`` reads it.

    python benchmarks/make_demo_reward_bench.py        # ~5 min on 2 cores; seeded (Python and torch)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import miniature_task as task
import reward_bench as rb
import reward_bench_task as rbt

from grape_rewards.corpus.files import atomic_write_bytes
from grape_rewards.demo import data_path

SAMPLES = 8
STOPWORDS = {"a", "an", "the", "in", "on", "at", "of", "to", "his", "her", "their", "with", "and", "by", "for", "up",
             "over", "along", "across", "while", "from", "into", "past", "near", "under", "beside", "during", "its"}


def content_words(text: str) -> list[str]:
    return [w for w in rbt.normalise(text).split() if w not in STOPWORDS]


def shifted_query(caption: str, i: int, rng: random.Random) -> str:
    """Even captions: buried in chatter; odd ones: most long words misspelt."""
    if i % 2 == 0:
        filler = rng.sample(rbt.CHATTER, 6)
        return " ".join([*filler[:3], f"I think it showed this: {caption.lower().rstrip('.')}.", *filler[3:]])
    return " ".join(task.typo(w, rng) if len(w) >= 4 and rng.random() < 0.6 else w
                    for w in caption.lower().rstrip(".").split())


def main() -> int:
    captions = {}
    for line in data_path("captions.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        captions[row["id"]] = row["text"]
    rng = random.Random("demo-reward-bench")
    queries = []
    for i, (item_id, caption) in enumerate(captions.items()):
        words = set(content_words(caption))
        nearest = max((other for other in captions if other != item_id),
                      key=lambda o: (len(words & set(content_words(captions[o]))), o))
        queries.append({"query_id": f"demo-{item_id}", "query": shifted_query(caption, i, rng),
                        "target_ids": [item_id], "kind": "chatter" if i % 2 == 0 else "typos",
                        "nearest": nearest})
    model, tokenizer = rb.load_policy()
    plan = rb.Plan(samples=SAMPLES, batch_rows=64)
    import torch
    from grpo_miniature import generate_sharing_prefill

    from grape_rewards.rewards import extract_rewrite

    prompts = [tokenizer(tokenizer.apply_chat_template(
        [{"role": "system", "content": rb.SYSTEM_PROMPT},
         {"role": "user", "content": rb.USER_TEMPLATE.format(query=q["query"])}], tokenize=False,
        add_generation_prompt=True), add_special_tokens=False)["input_ids"] for q in queries]
    torch.manual_seed(0)
    per_batch = plan.batch_rows // SAMPLES
    for start in range(0, len(queries), per_batch):
        with torch.inference_mode():
            tokens = generate_sharing_prefill(model, prompts[start:start + per_batch], SAMPLES,
                                              pad_token_id=tokenizer.pad_token_id, max_new_tokens=plan.max_new_tokens,
                                              do_sample=True, temperature=plan.temperature, top_p=plan.top_p,
                                              top_k=0)
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for j, q in enumerate(queries[start:start + per_batch]):
            sampled = [extract_rewrite(t).text for t in texts[j * SAMPLES:(j + 1) * SAMPLES]]
            q["candidates"] = [{"rewrite": t, "kind": "sampled"} for t in sampled if t]
        print(f"{min(start + per_batch, len(queries))}/{len(queries)} queries sampled", flush=True)
    rows = []
    for q in queries:
        target = captions[q["target_ids"][0]]
        other = captions[q.pop("nearest")]
        stuffed = content_words(target) + [w for w in content_words(other) if w not in content_words(target)][:3]
        stuffed += ["photo", "image"]
        rng.shuffle(stuffed)
        q["candidates"] += [{"rewrite": q["query"], "kind": "copy"},
                            {"rewrite": ", ".join(stuffed), "kind": "keywords"},
                            {"rewrite": "a photo of " + " ".join(content_words(target)[:1]), "kind": "generic"},
                            {"rewrite": other, "kind": "hard_negative"}]
        rows.append(json.dumps(q, ensure_ascii=False))
    atomic_write_bytes(data_path("reward_bench.jsonl"), ("\n".join(rows) + "\n").encode("utf-8"))
    print(f"wrote {data_path('reward_bench.jsonl')}: {len(rows)} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())

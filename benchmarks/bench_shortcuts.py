"""What two of the package's shortcuts buy over their plain paths, on the CPU, in one run (see docs/shortcuts.md).

- tokenizer: :class:`~grape_rewards.retrievers.clip_tokenizer.FastCLIPTokenizer` vs open_clip's own tokenizer, on
  512 English rewrites (the token tensor a batch is encoded from);
- causal tower: :func:`~grape_rewards.retrievers.openclip.causal_transformer` (scaled_dot_product_attention,
  is_causal; the path CUDA runs) vs open_clip's masked ``nn.MultiheadAttention`` blocks (the path the CPU runs), the
  text transformer of a random-init ViT-B-32 on 128 embedded rewrites at their true length.

A third, the label parsing that skipped pydantic, was removed after this benchmark measured it slower than the
validation it replaced (``results/shortcuts-cpu-before-removal.md``).

Each pair computes the same thing (asserted before timing); the figure is the plain path's time over the shortcut's.

    python benchmarks/bench_shortcuts.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from common import write_result

from grape_rewards.retrievers import create_retriever
from grape_rewards.retrievers import openclip as openclip_module

WORDS = ("a dog cat red blue green small large man woman child car street park beach river house tree "
         "running sitting playing walking holding wearing near under over next to in on with the").split()


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls (the least disturbed on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def rewrites(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))) for _ in range(count)]


def bench_tokenizer(retriever: Any, repeats: int) -> dict[str, float]:
    texts = rewrites(512)
    fast, plain_tok = retriever.fast_tokenizer, retriever.tokenizer
    assert fast is not None and torch.equal(fast.pack(fast.encode(texts)), plain_tok(texts))
    plain = best_seconds(lambda: plain_tok(texts), repeats)
    short = best_seconds(lambda: fast.pack(fast.encode(texts)), repeats)
    return {"plain_ms": plain * 1e3, "shortcut_ms": short * 1e3, "speedup": plain / short}


def bench_causal_tower(retriever: Any, repeats: int) -> dict[str, float]:
    """The text transformer alone on embedded tokens: open_clip's blocks with the additive causal mask (the plain
    path, what the CPU runs) vs :func:`~grape_rewards.retrievers.openclip.causal_transformer` (the CUDA path)."""
    tokens = retriever.fast_tokenizer.pack(retriever.fast_tokenizer.encode(rewrites(128, seed=1)))
    width = int((tokens != 0).sum(1).max())
    tower = openclip_module._text_tower(retriever.model)
    assert tower is not None and openclip_module._plain_blocks(tower.transformer)
    with torch.inference_mode():
        x = tower.token_embedding(tokens[:, :width]) + tower.positional_embedding[:width]
        mask = tower.attn_mask[:width, :width]

        def plain_path() -> torch.Tensor:
            return tower.transformer(x, attn_mask=mask)

        def causal_path() -> torch.Tensor:
            return openclip_module.causal_transformer(tower.transformer, x)

        assert torch.allclose(plain_path(), causal_path(), atol=1e-4)
        plain = best_seconds(plain_path, repeats)
        short = best_seconds(causal_path, repeats)
    return {"texts": 128.0, "tokens": float(width), "plain_ms": plain * 1e3, "shortcut_ms": short * 1e3,
            "speedup": plain / short}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    retriever = create_retriever("random:open_clip:ViT-B-32", device="cpu")
    result = {"tokenizer": bench_tokenizer(retriever, args.repeats),
              "causal_tower": bench_causal_tower(retriever, args.repeats),
              "torch_threads": torch.get_num_threads()}
    rows = [f"| {name} | {r['speedup']:.2f}x | " + ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k != "speedup")
            + " |" for name, r in result.items() if isinstance(r, dict)]
    markdown = ("# Shortcuts vs their plain paths (CPU)\n\n{header}"
                "| shortcut | plain / shortcut | detail |\n|---|---:|---|\n" + "\n".join(rows) + "\n")
    write_result("shortcuts-cpu", result, markdown)
    print(markdown.replace("{header}", ""))


if __name__ == "__main__":
    main()

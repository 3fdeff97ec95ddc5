"""Padding-free text encoding vs the padded encoder (open_clip ViT-B-32 text tower, random init).

Measures rewrites per second at the same batch size for 15-token rewrites, and the roofline column:
useful FLOP/s (encoder FLOPs at the true token counts) over the measured matmul peak of the same machine.

    python benchmarks/bench_text_encoding.py [--device cpu] [--batch-sizes 64 256] [--seconds 5]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import matmul_peak_flops, text_tower_flops, write_result

from grape_rewards.retrievers import create_retriever

WORDS = ("a dog cat red blue green small large man woman child car street park beach river house tree "
         "running sitting playing walking holding wearing near under over next to in on with the").split()


def rewrites_of_tokens(retriever, count: int, tokens: int, seed: int = 0) -> list[str]:
    """Random word sequences whose token count (start/end included) is exactly ``tokens``."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        words = [rng.choice(WORDS) for _ in range(tokens)]
        while words and retriever.text_info([" ".join(words)])[0].num_tokens > tokens:
            words.pop()
        text = " ".join(words)
        if retriever.text_info([text])[0].num_tokens == tokens:
            out.append(text)
    return out


def rate(retriever, texts: list[str], batch_size: int, seconds: float) -> float:
    retriever.encode_texts(texts[:batch_size], batch_size=batch_size)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        retriever.encode_texts(texts, batch_size=batch_size)
        done += len(texts)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--tokens", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    retriever = create_retriever(f"random:open_clip:{args.model}", device=args.device)
    cfg = retriever.model.transformer
    width, layers = cfg.width, cfg.layers
    peak = matmul_peak_flops(device)
    rows = []
    for bs in args.batch_sizes:
        texts = rewrites_of_tokens(retriever, bs * 2, args.tokens)
        flops_each = text_tower_flops([args.tokens], width, layers, retriever.dim)
        retriever.pad_free = False
        padded = rate(retriever, texts, bs, args.seconds)
        retriever.pad_free = True
        free = rate(retriever, texts, bs, args.seconds)
        rows.append({"batch_size": bs, "tokens": args.tokens, "padded_per_s": padded, "pad_free_per_s": free,
                     "speedup": free / padded, "useful_flops_pad_free": free * flops_each,
                     "roofline_fraction_pad_free": free * flops_each / peak,
                     "roofline_fraction_padded": padded * flops_each / peak})
    lines = [f"# Padding-free text encoding (open_clip {args.model} text tower, random init)\n",
             "{header}",
             f"Matmul peak (fp32, 2048^3, same run): {peak / 1e9:.1f} GFLOP/s. Target: pad-free >= 3x padded.\n",
             "| batch | tokens | padded /s | pad-free /s | speed-up | useful GFLOP/s (pad-free) | of peak (pad-free) "
             "| of peak (padded) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['tokens']} | {r['padded_per_s']:.0f} | {r['pad_free_per_s']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['useful_flops_pad_free'] / 1e9:.1f} | "
                     f"{100 * r['roofline_fraction_pad_free']:.0f}% | {100 * r['roofline_fraction_padded']:.0f}% |")
    markdown = "\n".join(lines) + "\n\nUseful FLOPs count the encoder at the true token count only; the padded " \
        "encoder spends the rest on padding, which is why its fraction of peak is low.\n"
    write_result(f"text-encoding-{device.type}", {"peak_flops": peak, "rows": rows}, markdown)
    print(markdown.replace("{header}", ""))


if __name__ == "__main__":
    main()

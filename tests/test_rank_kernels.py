"""The fused max-and-count kernel of the rank scan equals torch, run by Triton's interpreter on the CPU (and
natively where a GPU is present); the scan through it equals the torch scan; ``auto`` uses it only where its check
passed and it was faster."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch
    from grape_rewards.corpus import rank, rank_kernels, scan_counts

    device = "{device}"
    g = torch.Generator().manual_seed(0)
    for rows, cols in [(3, 10), (3, 20000), (1, 16384), (2, 16385), (7, 1), (0, 5)]:
        s = torch.randn(rows, cols, generator=g).to(device)
        high = torch.randn(rows, generator=g).to(device)
        low = high - 0.5
        if rows > 1:
            s[0, :3] = float("-inf")
            s[1, 5 % cols] = high[1]  # ties: not above
            s[1, 6 % cols] = low[1]
            s[0, 4 % cols] = low[0]
            high[rows - 1] = low[rows - 1] = float("-inf")  # everything finite is above
        m, c_high, c_low = rank_kernels.row_max_count(s, high, low)
        assert c_high.dtype == c_low.dtype == torch.int64
        assert torch.equal(c_high, (s > high[:, None]).sum(1)), (rows, cols)
        assert torch.equal(c_low, (s > low[:, None]).sum(1)), (rows, cols)
        assert rows == 0 or torch.equal(m, s.amax(1)), (rows, cols)

    # The scan through the kernel equals the torch scan (chunks, masked pairs, duplicates).
    corpus = torch.nn.functional.normalize(torch.randn(3000, 16, generator=g), dim=1).to(device)
    q = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=1).to(device)
    corpus[1::2] = corpus[0::2]  # bit-identical duplicates: near-ties decided exactly on both paths
    masked = [[i, i, (7 * i) % 3000] for i in range(9)]
    thresholds = rank.target_scores(q, corpus, [[2 * i] for i in range(9)]).clone()
    thresholds[:3] = (torch.randn(3, generator=g) * 0.3).double()
    original = rank._use_fused
    try:
        for chunk, extras in [(c, e) for c in (1000, 9 * 3000, 450)
                              for e in (rank.NO_EXTRAS, rank.ScanExtras(neighbours=True, soft_temperature=0.05))]:
            rank._use_fused = lambda corpus: True
            fused = scan_counts(q, corpus, thresholds, masked, chunk, extras=extras)
            rank._use_fused = lambda corpus: False
            plain = scan_counts(q, corpus, thresholds, masked, chunk, extras=extras)
            for a, b in zip(fused.__dict__.values(), plain.__dict__.values()):
                assert (a is None and b is None) or torch.equal(a, b), chunk
            exact = (q.double() @ corpus.double().T).cpu()
            exact[torch.arange(9)[:, None], torch.tensor(masked)] = float("-inf")
            assert torch.equal(fused.count_above, (exact > thresholds[:, None]).sum(1)), chunk
    finally:
        rank._use_fused = original

    # The check that GRAPE_FUSED_RANK=auto runs on each GPU before using the kernel.
    checked = rank_kernels.probe(torch.device(device), rows=3, cols=20000, repeats=1)
    assert checked["equal"] and checked["error"] is None and checked["fused_ms"] > 0, checked
    print("ok")
""")


def test_kernel_in_the_interpreter_equals_torch():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", CHECK.format(device="cpu")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the interpreter test above runs everywhere)")
def test_kernel_on_the_gpu_equals_torch():
    exec(CHECK.format(device="cuda"), {})


def test_modes_and_auto_uses_the_kernel_only_where_it_checked_equal_and_faster(monkeypatch):
    from grape_rewards.corpus import rank_kernels

    for value, mode in [("", "auto"), ("AUTO", "auto"), ("1", "on"), ("on", "on"), ("0", "off"), ("false", "off")]:
        monkeypatch.setenv(rank_kernels.ENV, value)
        assert rank_kernels.fused_mode() == mode
    monkeypatch.setenv(rank_kernels.ENV, "yes please")
    with pytest.raises(ValueError, match="GRAPE_FUSED_RANK='yes please'"):
        rank_kernels.fused_mode()

    monkeypatch.setenv(rank_kernels.ENV, "1")
    assert not rank_kernels.use_fused(torch.device("cpu"))  # never off the GPU
    probes = {"cuda:0": {"equal": True, "fused_ms": 0.07, "torch_ms": 0.57, "error": None},
              "cuda:1": {"equal": False, "fused_ms": 0.07, "torch_ms": 0.57, "error": None},
              "cuda:2": {"equal": True, "fused_ms": 0.9, "torch_ms": 0.57, "error": None}}
    calls = []

    def fake_probe(device):
        calls.append(str(device))
        return probes[str(device)]

    monkeypatch.setattr(rank_kernels, "probe", fake_probe)
    monkeypatch.setattr(rank_kernels, "_checked", {})
    monkeypatch.setenv(rank_kernels.ENV, "auto")
    used = {d: rank_kernels.use_fused(torch.device(d)) for d in probes}
    assert used == {"cuda:0": True, "cuda:1": False, "cuda:2": False}
    assert rank_kernels.use_fused(torch.device("cuda:0")) and calls == list(probes)  # checked once per device
    monkeypatch.setenv(rank_kernels.ENV, "0")
    assert not rank_kernels.use_fused(torch.device("cuda:0"))


def test_probe_reports_a_kernel_that_cannot_run_instead_of_raising():
    """Compiled Triton cannot run on CPU tensors (no interpreter in this process): the check says why, and auto
    would keep the torch path."""
    from grape_rewards.corpus import rank_kernels

    checked = rank_kernels.probe(torch.device("cpu"), rows=4, cols=100, repeats=1)
    assert checked["equal"] is False and checked["error"], checked
    assert "TRITON_INTERPRET" not in os.environ

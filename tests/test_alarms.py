"""Reward-hacking alarms: each fires within one window on traffic built to trigger it, none fires on 10,000 samples
of healthy traffic (the demo's faithful captions, varied, scored by the real MiniLM scorer in GRPO groups of 8).

Healthy traffic is scored once through a scorer; the attacks are that traffic transformed the way each failure
would transform it (similarities inflated, rewrites lengthened, group members identical, keyword lists, garbage),
fed to a fresh :class:`AlarmMonitor` after two healthy windows (the trend alarms compare against the window before).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from grape_rewards.alarms import ALARM_KEYS, ALARMS, FUNCTION_WORDS, AlarmMonitor, is_keyword_list
from grape_rewards.corpus import CorpusIndex
from grape_rewards.demo import data_path
from grape_rewards.retrievers import TextEmbedder
from grape_rewards.rewards import RewardConfig
from grape_rewards.rewards.config import AlarmConfig, FormatConfig
from grape_rewards.scorer import RewardItem, RewardScorer, group_key

WINDOW = AlarmConfig().window
GROUP = 8
PREFIXES = ("", "A photo of ", "An image showing ")


@dataclass(frozen=True)
class Sample:
    text: str | None
    group: str
    stats: dict[str, float]
    overlong: bool = False


def faithful_variants(caption: str) -> list[str]:
    """Faithful rewrites of a caption: prefixed, lower-cased or not, with one content word dropped or not."""
    words = caption.rstrip(".").split()
    drops = [None, *[i for i, w in enumerate(words) if i > 0 and w.lower() not in FUNCTION_WORDS][:3]]
    out = []
    for prefix in PREFIXES:
        for drop in drops:
            kept = [w for i, w in enumerate(words) if i != drop]
            body = " ".join(kept)
            out.append(prefix + (body[0].lower() + body[1:] if prefix else body))
    return out


@pytest.fixture(scope="module")
def index_dir(demo_index_dir: Path) -> Path:
    return demo_index_dir


@pytest.fixture(scope="module")
def scorer(minilm: TextEmbedder, index_dir: Path) -> RewardScorer:
    return RewardScorer(minilm, CorpusIndex.load(index_dir), RewardConfig(alarms=AlarmConfig(enabled=False)))


@pytest.fixture(scope="module")
def healthy(scorer: RewardScorer) -> list[Sample]:
    """10,000 healthy samples: GRPO groups of 8 faithful rewrites of one caption each, scored for real.

    Each distinct (rewrite, caption) pair is scored once (600 pairs: 50 captions x 12 rewrites) and the stream
    is drawn from them; a sample's statistics are what the scorer gives its rewrite.
    """
    rng = random.Random(0)
    captions = [json.loads(line) for line in data_path("captions.jsonl").read_text().splitlines()][:50]
    pairs = [(row, text) for row in captions for text in faithful_variants(row["text"])]
    items = [RewardItem(rewrite=text, target_ids=[row["id"]]) for row, text in pairs]
    stats = [s for start in range(0, len(items), 256) for s in scorer.score(items[start:start + 256])]
    scored = {(row["id"], text): s for (row, text), s in zip(pairs, stats)}
    samples: list[Sample] = []
    for g in range(10_000 // GROUP):
        row = rng.choice(captions)
        variants = faithful_variants(row["text"])
        for _ in range(GROUP):
            text = rng.choice(variants)
            samples.append(Sample(text, group_key(RewardItem(rewrite=text, target_ids=[row["id"]], query_id=f"q{g}")),
                                  dict(scored[row["id"], text])))
    assert len(samples) == 10_000
    return samples


def feed(monitor: AlarmMonitor, samples: list[Sample], batch: int = 64) -> Iterator[int]:
    """Observe ``samples`` in batches; yield the number fed so far after each batch."""
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        monitor.observe([s.text for s in chunk], [s.group for s in chunk], [s.stats for s in chunk],
                        [s.overlong for s in chunk])
        yield start + len(chunk)


def samples_until_on(name: str, baseline: list[Sample], attack: list[Sample]) -> int | None:
    """Feed the baseline (alarm must stay off), then the attack; how many attack samples turned ``name`` on."""
    monitor = AlarmMonitor()
    for _ in feed(monitor, baseline):
        assert not any(monitor.active.values()), monitor.snapshot()
    for fed in feed(monitor, attack):
        if monitor.active[name]:
            return fed
    return None


# -- attacks: healthy traffic, transformed the way each failure would transform it --------------------------------
def inflated(s: Sample) -> Sample:
    """Every similarity up by 0.1 (target, best and mean non-target): margin and rank unchanged."""
    stats = dict(s.stats)
    for key in ("target_sim", "mean_sim", "best_nontarget_sim"):
        stats[key] += 0.1
    return replace(s, stats=stats)


def lengthened(s: Sample) -> Sample:
    filler = ", shown in great detail with everything around it in the scene visible"
    stats = dict(s.stats, num_tokens=s.stats["num_tokens"] + 14)
    return replace(s, text=(s.text or "") + filler, stats=stats)


def truncated(s: Sample) -> Sample:
    return replace(s, stats=dict(s.stats, truncated=1.0))


def keyword_list(s: Sample) -> Sample:
    words = [w for w in re.findall(r"[a-z]+", (s.text or "").lower()) if w not in FUNCTION_WORDS]
    return replace(s, text=", ".join([*words, "photo", "image", "scene"]))


def garbage(s: Sample) -> Sample:
    """No rewrite could be read from the completion (the scorer's placeholder statistics)."""
    return replace(s, text=None, stats=dict(s.stats, target_sim=0.0, mean_sim=0.0, margin=0.0, num_tokens=0.0))


def collapsed(samples: list[Sample]) -> list[Sample]:
    """Every member of a group repeats the group's first rewrite."""
    first: dict[str, str | None] = {}
    return [replace(s, text=first.setdefault(s.group, s.text)) for s in samples]


ATTACKS: dict[str, tuple[str, Callable[[list[Sample]], list[Sample]]]] = {
    "inflation": ("similarity_inflation", lambda xs: [inflated(s) for s in xs]),
    "lengthening": ("length_blowup", lambda xs: [lengthened(s) for s in xs]),
    "truncation": ("length_blowup", lambda xs: [truncated(s) if i % 3 == 0 else s for i, s in enumerate(xs)]),
    "identical_group_members": ("collapse", collapsed),
    "keyword_lists": ("keyword_stuffing", lambda xs: [keyword_list(s) if i % 3 == 0 else s for i, s in enumerate(xs)]),
    "garbage_completions": ("format_failures", lambda xs: [garbage(s) if i % 3 == 0 else s for i, s in enumerate(xs)]),
}


@pytest.mark.slow
def test_no_alarm_on_10000_healthy_samples(healthy: list[Sample]) -> None:
    monitor = AlarmMonitor()
    checked = 0
    for fed in feed(monitor, healthy):
        assert not any(monitor.active.values()), (fed, monitor.snapshot())
        checked += fed >= 2 * WINDOW
    assert checked > 100  # every rule was evaluated, trends included, over most of the traffic
    stats = monitor.snapshot()["stats"]
    assert all(v is not None and math.isfinite(v) for v in stats.values()), stats  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_alarm_fires_within_one_window(healthy: list[Sample], attack: str) -> None:
    name, transform = ATTACKS[attack]
    baseline, rest = healthy[:2 * WINDOW], healthy[2 * WINDOW:3 * WINDOW]
    fed = samples_until_on(name, baseline, transform(rest))
    assert fed is not None and fed <= WINDOW, (attack, fed)


@pytest.mark.slow
def test_inflation_needs_a_flat_margin(healthy: list[Sample]) -> None:
    """Target similarity rising with the margin (real retrieval gains) is not inflation."""
    def better(s: Sample) -> Sample:
        stats = dict(s.stats, target_sim=s.stats["target_sim"] + 0.1, mean_sim=s.stats["mean_sim"] + 0.1,
                     margin=s.stats["margin"] + 0.1)
        return replace(s, stats=stats)

    assert samples_until_on("similarity_inflation", healthy[:2 * WINDOW],
                            [better(s) for s in healthy[2 * WINDOW:3 * WINDOW]]) is None


def test_keyword_list_statistic() -> None:
    assert is_keyword_list("Restaurant, wine, glasses, toast, waiter, dinner, party, drinks, pasta, chef.")
    assert is_keyword_list("狗，飞盘，公园，草地，阳光")
    for sentence in ("A waiter pours wine for guests at an elegant dinner table.", "一只棕色的狗在公园里接飞盘",
                     "Two tennis players shake hands over the net after a match.", "dog park"):
        assert not is_keyword_list(sentence), sentence


def test_scorer_carries_the_flags_and_warns_once(minilm: TextEmbedder, index_dir: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Through the scorer: every sample carries every flag; garbage completions turn format_failures on with one
    WARNING however many batches follow; healthy completions turn it off again."""
    out = index_dir
    config = RewardConfig(format=FormatConfig(require_answer_tag=True), alarms=AlarmConfig(window=32))
    scorer = RewardScorer(minilm, CorpusIndex.load(out), config)
    assert scorer.keys[-len(ALARM_KEYS):] == ALARM_KEYS
    captions = [json.loads(line) for line in data_path("captions.jsonl").read_text().splitlines()][:16]
    good = [RewardItem(completion=f"<answer>{row['text']}</answer>", target_ids=[row["id"]]) for row in captions]
    bad = [RewardItem(completion="I think the answer is a dog", target_ids=["cap000"]) for _ in range(16)]
    with caplog.at_level(logging.WARNING, logger="grape_rewards.alarms"):
        for _ in range(2):
            samples = scorer.score(good)
            assert all(s["alarm_format_failures"] == 0.0 for s in samples)
        for _ in range(4):
            samples = scorer.score(bad)
        assert all(set(scorer.keys) == set(s) for s in samples)
        assert all(s["alarm_format_failures"] == 1.0 for s in samples)
    warnings = [r.getMessage() for r in caplog.records if "format_failures" in r.getMessage()]
    assert len(warnings) == 1 and re.search(r"format_failure_share=0\.[5-9]", warnings[0]), warnings
    assert scorer.alarms is not None and scorer.alarms.snapshot()["active"] == ["format_failures"]
    for _ in range(2):
        samples = scorer.score(good)
    assert samples[0]["alarm_format_failures"] == 0.0
    off = RewardScorer(minilm, CorpusIndex.load(out), RewardConfig(alarms=AlarmConfig(enabled=False)))
    assert off.alarms is None and not set(ALARM_KEYS) & set(off.score(good[:1])[0])
    assert ALARMS == tuple(k.removeprefix("alarm_") for k in ALARM_KEYS)


def test_service_and_adapters_expose_the_alarms(minilm: TextEmbedder, index_dir: Path) -> None:
    """/metrics has grape_alarm{name} and its statistics, /info lists the active alarms, OpenRLHF's extra_logs and
    TRL's logged metrics carry the flags."""
    from grape_rewards.adapters.trl import make_reward_func
    from grape_rewards.server import ServeConfig, create_app
    from grape_rewards.server.testing import ServerThread

    scorer = RewardScorer(minilm, CorpusIndex.load(index_dir),
                          RewardConfig(format=FormatConfig(require_answer_tag=True), alarms=AlarmConfig(window=16)))
    label = json.dumps({"target_ids": ["cap000"]})
    with ServerThread(create_app(scorer, ServeConfig(index=str(index_dir)))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        info = http.get("/info").json()
        assert info["alarms"]["active"] == [] and set(info["alarms"]["alarms"]) == set(ALARMS)
        answer = http.post("/get_reward", json={"query": ["no tags here"] * 16, "labels": [label] * 16}).json()
        assert answer["extra_logs"]["alarm_format_failures"] == [1.0] * 16
        assert answer["extra_logs"]["alarm_collapse"] == [0.0] * 16
        metrics = http.get("/metrics").text
        assert 'grape_alarm{name="format_failures"} 1.0' in metrics
        assert 'grape_alarm{name="keyword_stuffing"} 0.0' in metrics
        assert 'grape_alarm_stat{stat="format_failure_share"} 1.0' in metrics
        assert http.get("/info").json()["alarms"]["active"] == ["format_failures"]
    logged: dict[str, float] = {}
    reward = make_reward_func(scorer=scorer)
    reward(prompts=["p"], completions=["still no tags"], grape_label=[label],
           log_metric=lambda key, value: logged.__setitem__(key, value))
    assert logged["grape/alarm_format_failures"] == 1.0 and logged["grape/alarm_collapse"] == 0.0

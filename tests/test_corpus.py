"""Index build (batched, resumable, atomic), loading checks, and top-k search."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grape_rewards.corpus import (
    CorpusIndex,
    CorpusIndexError,
    CorpusSource,
    CorpusSourceError,
    UnknownIdError,
    build_index,
    read_source,
)
from grape_rewards.corpus.search import build_searcher, torch_topk

CAPTIONS = [f"caption {i}: a {c} {a} near the {p}" for i, (c, a, p) in enumerate(
    (c, a, p) for c in ("red", "blue", "green") for a in ("dog", "cat", "car", "bird") for p in ("river", "house"))]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_source(tmp_path: Path, n: int = len(CAPTIONS)) -> CorpusSource:
    return read_source(write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"t{i}", "text": c}
                                                              for i, c in enumerate(CAPTIONS[:n])]))


class Killed(Exception):
    """Raised by a build's on_shard hook: the build stops there, as a killed process would."""


def build_killed_after_two_shards(source: CorpusSource, retriever, out: Path, **options) -> None:
    """Start a build of ``source`` into ``out`` and stop it once its second shard is saved."""

    def kill_after_two(shard: int) -> None:
        if shard == 1:
            raise Killed

    with pytest.raises(Killed):
        build_index(source, retriever, out, progress=False, on_shard=kill_after_two, **options)


def test_build_text_index_and_manifest(tmp_path, minilm):
    index = build_index(text_source(tmp_path), minilm, tmp_path / "idx", batch_size=5, shard_size=7, progress=False)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["count"] == len(CAPTIONS) and manifest["dim"] == 384 and manifest["dtype"] == "float16"
    assert manifest["retriever"]["fingerprint"] == minilm.fingerprint
    assert manifest["retriever"]["spec"] == "text:all-MiniLM-L6-v2"
    assert set(manifest["checksums"]) == {"embeddings.safetensors", "ids.json", "contents.bin",
                                          "contents-offsets.safetensors"} and manifest["created_at"]
    assert not (tmp_path / "idx.partial").exists()
    direct = minilm.encode_texts(CAPTIONS)
    assert torch.allclose(index.embeddings.float(), direct, atol=2e-3)
    assert index.ids == [f"t{i}" for i in range(len(CAPTIONS))]
    assert index.contents_kind == "text" and index.contents(["t3", "t0"]) == [CAPTIONS[3], CAPTIONS[0]]


def test_build_image_folder_index(tmp_path, tiny_open_clip, images):
    index = build_index(read_source(images[0].parent), tiny_open_clip, tmp_path / "idx", batch_size=3,
                        progress=False)
    assert index.ids == sorted(p.stem for p in images)
    direct = tiny_open_clip.encode_images(sorted(images))
    assert torch.allclose(index.embeddings.float(), direct, atol=2e-3)
    assert torch.allclose(index.embeddings.float().norm(dim=1), torch.ones(len(images)), atol=2e-3)


def test_interrupted_build_resumes_identically(tmp_path, minilm, monkeypatch):
    source = text_source(tmp_path)
    reference = build_index(source, minilm, tmp_path / "ref", batch_size=4, shard_size=5, progress=False)

    build_killed_after_two_shards(source, minilm, tmp_path / "idx", batch_size=4, shard_size=5)
    assert not (tmp_path / "idx").exists()
    with pytest.raises(CorpusIndexError, match="rerun the same build to resume"):
        CorpusIndex.load(tmp_path / "idx")
    encoded: list[int] = []
    real = minilm.encode_texts
    monkeypatch.setattr(minilm, "encode_texts", lambda texts, batch_size=256: encoded.append(len(texts)) or real(
        texts, batch_size=batch_size))
    resumed = build_index(source, minilm, tmp_path / "idx", batch_size=4, shard_size=5, progress=False)
    assert sum(encoded) == len(CAPTIONS) - 10  # the two finished shards were not encoded again
    assert (tmp_path / "idx" / "embeddings.safetensors").read_bytes() == \
        (tmp_path / "ref" / "embeddings.safetensors").read_bytes()
    assert resumed.ids == reference.ids
    assert resumed.manifest["checksums"] == reference.manifest["checksums"]


@pytest.mark.slow
def test_killed_process_resumes(tmp_path):
    """A real SIGKILL in the middle of `grape-rewards index build`, then the same command again."""
    many = [{"id": f"x{i}", "text": f"{CAPTIONS[i % len(CAPTIONS)]} number {i}"} for i in range(600)]
    manifest = write_jsonl(tmp_path / "many.jsonl", many)
    cmd = [sys.executable, "-m", "grape_rewards.cli", "index", "build", "--retriever", "text:all-MiniLM-L6-v2",
           "--device", "cpu", "--source", str(manifest), "--out", str(tmp_path / "idx"), "--shard-size", "50",
           "--batch-size", "25", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    staging = tmp_path / "idx.partial"
    deadline = time.time() + 120
    while time.time() < deadline and not list(staging.glob("shard-000001.safetensors")):
        assert proc.poll() is None, proc.communicate()[1].decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "idx").exists()
    done_before = len(list(staging.glob("shard-*.safetensors")))
    assert 2 <= done_before < 12
    subprocess.run(cmd, check=True, capture_output=True)
    subprocess.run([*cmd[:-3], "--out", str(tmp_path / "ref"), "--quiet"], check=True, capture_output=True)
    assert (tmp_path / "idx" / "embeddings.safetensors").read_bytes() == \
        (tmp_path / "ref" / "embeddings.safetensors").read_bytes()
    assert not staging.exists()


def test_checksum_and_fingerprint_are_enforced(tmp_path, minilm, tiny_open_clip):
    build_index(text_source(tmp_path, 6), minilm, tmp_path / "idx", progress=False)
    CorpusIndex.load(tmp_path / "idx", expected_fingerprint=minilm.fingerprint)
    with pytest.raises(CorpusIndexError, match="built with retriever 'text:all-MiniLM-L6-v2'.*meaningless"):
        CorpusIndex.load(tmp_path / "idx", expected_fingerprint=tiny_open_clip.fingerprint,
                         expected_spec=tiny_open_clip.spec)
    emb = tmp_path / "idx" / "embeddings.safetensors"
    data = bytearray(emb.read_bytes())
    data[-1] ^= 0xFF
    emb.write_bytes(bytes(data))
    with pytest.raises(CorpusIndexError, match="checksum of embeddings.safetensors does not match"):
        CorpusIndex.load(tmp_path / "idx")


def test_fingerprint_changes_with_weights(tmp_path, text_encoder_dir):
    from grape_rewards.retrievers import create_retriever

    a = create_retriever(f"text:{text_encoder_dir}", device="cpu")
    b = create_retriever(f"text:{text_encoder_dir}", device="cpu")
    assert a.fingerprint == b.fingerprint
    with torch.no_grad():
        next(b.model.parameters()).add_(1e-3)
    b._fingerprint = None
    assert a.fingerprint != b.fingerprint


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "image": "missing.png"}], "image file of id 'a' not found"),
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "duplicate id 'a'"),
        ([{"id": "a"}], "exactly one of the fields 'image'"),
        ([{"text": "x"}], "missing field 'id'"),
        ([{"id": "a", "text": "x"}, {"id": "b", "image": "i.png"}], "image item in a corpus of text"),
        ([{"id": "a", "text": "   "}], "empty text"),
    ],
)
def test_bad_manifests_are_named(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    (tmp_path / "i.png").write_bytes(b"")
    with pytest.raises(CorpusSourceError, match=message) as info:
        read_source(path)
    assert "m.jsonl:" in str(info.value)


def test_bad_json_line_and_csv(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": \n')
    with pytest.raises(CorpusSourceError, match=r"m.jsonl:2: invalid JSON"):
        read_source(path)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("id,text\na,a red car\nb,a blue bird\n")
    source = read_source(csv_path)
    assert source.ids == ["a", "b"] and source.modality == "text"
    (tmp_path / "bad.csv").write_text("name,text\na,x\n")
    with pytest.raises(CorpusSourceError, match="must name an 'id' column"):
        read_source(tmp_path / "bad.csv")


def test_missing_source_and_index_path_say_what_was_expected(tmp_path):
    """A missing --source names what to pass; an --index at the manifest file (not its folder) says so."""
    with pytest.raises(CorpusSourceError, match="images: no such file or folder; pass a folder of images, a "
                                                "JSONL/CSV of texts, or a source manifest"):
        read_source(tmp_path / "images")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "manifest.json").write_text("{}")
    with pytest.raises(CorpusIndexError, match=r"expected the index folder \(the one holding manifest.json\), got the "
                                          r"manifest file itself; pass its folder") as info:
        CorpusIndex.load(tmp_path / "idx" / "manifest.json")
    assert str(tmp_path / "idx") in str(info.value)
    with pytest.raises(CorpusIndexError, match="no such folder; pass a folder written by 'grape-rewards index build'"):
        CorpusIndex.load(tmp_path / "gone")


def test_unreadable_image_leaves_no_index(tmp_path, tiny_open_clip, images):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = [{"id": p.stem, "image": str(p)} for p in images[:3]] + [{"id": "broken", "image": str(broken)}]
    source = read_source(write_jsonl(tmp_path / "m.jsonl", rows))
    with pytest.raises(CorpusSourceError, match=r"corpus item 'broken': cannot read image .*broken.png"):
        build_index(source, tiny_open_clip, tmp_path / "idx", batch_size=2, shard_size=2, progress=False)
    assert not (tmp_path / "idx").exists()


def test_existing_index_needs_overwrite(tmp_path, minilm):
    source = text_source(tmp_path, 4)
    build_index(source, minilm, tmp_path / "idx", progress=False)
    with pytest.raises(FileExistsError, match=r"overwrite=True \(--overwrite on the command line\)"):
        build_index(source, minilm, tmp_path / "idx", progress=False)
    bigger = text_source(tmp_path, 6)
    index = build_index(bigger, minilm, tmp_path / "idx", progress=False, overwrite=True)
    assert len(index) == 6 and not (tmp_path / "idx.old").exists()


def test_modality_mismatch(tmp_path, tiny_open_clip):
    with pytest.raises(CorpusSourceError, match="cannot be embedded by"):
        build_index(text_source(tmp_path, 3), tiny_open_clip, tmp_path / "idx", progress=False)


def test_unknown_id_is_named(tmp_path, minilm):
    index = build_index(text_source(tmp_path, 3), minilm, tmp_path / "idx", progress=False)
    with pytest.raises(UnknownIdError, match="unknown corpus id 'nope'"):
        index.rows(["t0", "nope"])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_topk_matches_full_sort(backend):
    g = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(500, 16, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(7, 16, generator=g), dim=1)
    scores, rows = build_searcher(corpus, backend=backend).search(queries, 10)
    full = queries @ corpus.T
    expected_scores, expected_rows = full.topk(10, dim=1)
    assert torch.equal(rows, expected_rows)
    assert torch.allclose(scores, expected_scores, atol=1e-5)


def test_torch_topk_chunks_merge():
    corpus = torch.nn.functional.normalize(torch.randn(97, 8), dim=1)
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    _s, r = torch_topk(q, corpus, 5, chunk_elements=3 * 11)
    assert torch.equal(r, (q @ corpus.T).topk(5, dim=1).indices)


def test_index_search_returns_ids(tmp_path, minilm):
    index = build_index(text_source(tmp_path), minilm, tmp_path / "idx", progress=False)
    scores, ids = index.search(minilm.encode_texts([CAPTIONS[5]]), k=3)
    assert ids[0][0] == "t5" and scores.shape == (1, 3)


def test_resumed_build_encodes_a_damaged_shard_again(tmp_path, minilm):
    """A saved shard changed after it was written (same shape, other values) is not reused: the checksum saved
    with it disagrees, so it is encoded again and the index equals an uninterrupted build."""
    from safetensors.torch import load_file, save_file

    source = text_source(tmp_path)
    reference = build_index(source, minilm, tmp_path / "ref", batch_size=4, shard_size=5, progress=False)

    def stop(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(source, minilm, tmp_path / "idx", batch_size=4, shard_size=5, progress=False, on_shard=stop)
    shard = tmp_path / "idx.partial" / "shard-000000.safetensors"
    emb = load_file(str(shard))["embeddings"]
    save_file({"embeddings": (emb * 50).contiguous()}, str(shard))
    resumed = build_index(source, minilm, tmp_path / "idx", batch_size=4, shard_size=5, progress=False)
    assert resumed.manifest["checksums"] == reference.manifest["checksums"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("nan_row", r"row 3 \(id 't3'\) has non-finite values"),
        ("scaled_rows", r"row 0 \(id 't0'\) has L2 norm 50"),
        ("ids_object", "must hold a JSON list of string ids, it holds a dict"),
        ("ids_not_strings", "id at row 0 is 0, not a string"),
        ("ids_duplicate", "id 't0' appears more than once"),
        ("manifest_list", "holds a JSON list, not an object"),
        ("manifest_count", "'count' must be an integer >= 0, got '6'"),
        ("not_safetensors", "embeddings.safetensors is not a safetensors file"),
        ("wrong_tensor", "must hold one 2-D float tensor named 'embeddings'"),
        ("contents_offsets", "the offsets do not cut .*contents.bin \\(\\d+ bytes\\) into items in order"),
        ("contents_count", "must hold 7 int64 offsets for 6 items"),
    ],
)
def test_a_damaged_index_with_matching_checksums_is_refused_in_one_line(tmp_path, minilm, damage, message):
    """Checksums only say the files are the ones the manifest names; loading also checks what they hold."""
    from safetensors.torch import load_file, save_file

    from grape_rewards.corpus.files import atomic_write_json, sha256_file

    folder = tmp_path / "idx"
    build_index(text_source(tmp_path, 6), minilm, folder, progress=False)
    emb_file, ids_file, manifest_file = folder / "embeddings.safetensors", folder / "ids.json", folder / "manifest.json"
    emb = load_file(str(emb_file))["embeddings"]
    manifest = json.loads(manifest_file.read_text())
    if damage == "nan_row":
        emb[3] = float("nan")
        save_file({"embeddings": emb}, str(emb_file))
    elif damage == "scaled_rows":
        save_file({"embeddings": emb * 50}, str(emb_file))
    elif damage == "ids_object":
        ids_file.write_text(json.dumps({f"t{i}": i for i in range(6)}))
    elif damage == "ids_not_strings":
        ids_file.write_text(json.dumps(list(range(6))))
    elif damage == "ids_duplicate":
        ids_file.write_text(json.dumps(["t0"] * 6))
    elif damage == "manifest_list":
        manifest_file.write_text(json.dumps([manifest]))
    elif damage == "manifest_count":
        manifest["count"] = "6"
    elif damage == "not_safetensors":
        emb_file.write_bytes(b"\x00" * 64)
    elif damage == "wrong_tensor":
        save_file({"vectors": emb}, str(emb_file))
    elif damage.startswith("contents"):
        offsets = load_file(str(folder / "contents-offsets.safetensors"))["offsets"]
        offsets = offsets.flip(0) if damage == "contents_offsets" else offsets[:-1]
        save_file({"offsets": offsets.contiguous()}, str(folder / "contents-offsets.safetensors"))
    if damage != "manifest_list":
        manifest["checksums"] = {name: sha256_file(folder / name) for name in manifest["checksums"]}
        atomic_write_json(manifest_file, manifest)
    with pytest.raises(CorpusIndexError, match=message) as info:
        CorpusIndex.load(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, tiny_open_clip, images, umask):
    """Index files and prepared training data get 0666 minus the umask (not a temporary file's 0600), so another
    user (a Ray worker under another uid) can read a shared index."""
    from grape_rewards.prepare.write import write_jsonl

    old = os.umask(umask)
    try:
        build_index(read_source(images[0].parent), tiny_open_clip, tmp_path / "idx", progress=False)
        write_jsonl([{"prompt": "p", "label": "{}"}], tmp_path / "data" / "train.jsonl")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 4
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}


def test_identical_texts_share_one_embedding_so_a_copy_never_outranks_its_twin(tmp_path, minilm):
    """Every caption twice, the copies in other batches and shards: an encoder's float rounding depends on the batch
    an item is in, and a copy embedded a last bit closer to a query than its twin would push the target to rank 2,
    although the rank counts ties for the target. Identical items are encoded once and share the embedding."""
    from grape_rewards.demo import data_path

    texts = [json.loads(line)["text"] for line in data_path("captions.jsonl").read_text().splitlines()]
    rows = [{"id": f"t{i}", "text": c} for i, c in enumerate(texts)]
    rows += [{"id": f"copy{i}", "text": c} for i, c in reversed(list(enumerate(texts)))]
    index = build_index(read_source(write_jsonl(tmp_path / "twins.jsonl", rows)), minilm, tmp_path / "idx",
                        batch_size=16, shard_size=48, progress=False)
    twins = [(index.row_of[f"t{i}"], index.row_of[f"copy{i}"]) for i in range(len(texts))]
    differ = [i for i, (a, b) in enumerate(twins) if not torch.equal(index.embeddings[a], index.embeddings[b])]
    assert not differ, f"{len(differ)} twins embedded differently, e.g. {texts[differ[0]]!r}"
    queries = minilm.encode_texts(texts)
    for name in ("t", "copy"):
        ranks = index.rank(queries, [[f"{name}{i}"] for i in range(len(texts))]).rank
        assert ranks.tolist() == [1] * len(texts), name


def test_identical_image_files_share_one_embedding(tmp_path, tiny_open_clip, images, monkeypatch):
    """Images of the same bytes under other names (only files whose sizes collide are hashed) share the embedding
    of the first; the other images are encoded as before. The tiny model rounds alike in every batch on this CPU,
    so its encoder is made to round by batch size, as GPU kernels chosen by batch shape do."""
    import shutil

    real = tiny_open_clip.encode_images

    def rounds_by_batch(images: list, batch_size: int = 64) -> torch.Tensor:
        emb = real(images, batch_size=batch_size)
        return torch.nn.functional.normalize(emb + 1e-3 * len(images), dim=-1)

    monkeypatch.setattr(tiny_open_clip, "encode_images", rounds_by_batch)
    folder = tmp_path / "gallery"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name)
        shutil.copy(path, folder / f"z_copy_{path.name}")  # sorted after every original: other batches
    index = build_index(read_source(folder), tiny_open_clip, tmp_path / "idx", batch_size=3, progress=False)
    for path in images:
        a, b = index.row_of[path.stem], index.row_of[f"z_copy_{path.stem}"]
        assert torch.equal(index.embeddings[a], index.embeddings[b]), path.name
    assert torch.allclose(index.vectors([p.stem for p in images]), real(images), atol=2e-2)
    assert len({tuple(row.tolist()) for row in index.embeddings}) == len(images)


def test_a_text_index_keeps_each_items_contents_beside_its_id(tmp_path, minilm, images):
    """Search-R1's passage format: the text, headed by the title in double quotes when the item has one (not
    embedded: the same embedding with or without it). The store pickles (it reopens its map) and an image item
    with a title is refused."""
    import pickle

    rows = [{"id": "a", "text": "Aaron is a prophet.", "title": "Aaron"}, {"id": "b", "text": "a dog\non grass"},
            {"id": "c", "text": "一只猫", "title": ""}]
    index = build_index(read_source(write_jsonl(tmp_path / "titled.jsonl", rows)), minilm, tmp_path / "idx",
                        progress=False)
    assert index.contents(["a", "b", "c"]) == ['"Aaron"\nAaron is a prophet.', "a dog\non grass", "一只猫"]
    assert torch.equal(index.vectors(["a"]), minilm.encode_texts(["Aaron is a prophet."]).half().float())
    copy = pickle.loads(pickle.dumps(index.content_store))
    assert copy.get([2, 0]) == ["一只猫", '"Aaron"\nAaron is a prophet.']
    (tmp_path / "titled.csv").write_text("id,text,title\nx,some text,A Title\ny,more text,\n", encoding="utf-8")
    source = read_source(tmp_path / "titled.csv")
    assert list(source.contents()) == ['"A Title"\nsome text', "more text"]
    assert source.digest != read_source(write_jsonl(tmp_path / "plain.jsonl", [
        {"id": "x", "text": "some text"}, {"id": "y", "text": "more text"}])).digest
    image_rows = [{"id": "i", "image": str(images[0]), "title": "a picture"}]
    with pytest.raises(CorpusSourceError, match="'title' is read for text items only"):
        read_source(write_jsonl(tmp_path / "images.jsonl", image_rows))


def test_an_index_without_contents_files_still_loads_and_its_contents_are_its_ids(tmp_path, minilm, tiny_open_clip,
                                                                                    images):
    """Indexes built before the texts were kept (their manifest names no contents files), and image corpora."""
    from grape_rewards.corpus.files import atomic_write_json

    folder = tmp_path / "old"
    build_index(text_source(tmp_path, 6), minilm, folder, progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("contents.bin", "contents-offsets.safetensors"):
        del manifest["checksums"][name]
        (folder / name).unlink()
    atomic_write_json(folder / "manifest.json", manifest)
    old = CorpusIndex.load(folder)
    assert old.contents_kind == "id" and old.contents(["t2", "t0"]) == ["t2", "t0"]
    gallery = build_index(read_source(images[0].parent), tiny_open_clip, tmp_path / "gallery", progress=False)
    assert gallery.contents_kind == "id" and not (tmp_path / "gallery" / "contents.bin").exists()
    assert gallery.contents([images[1].stem]) == [images[1].stem]
    with pytest.raises(UnknownIdError):
        gallery.contents(["nope"])
    build_index(text_source(tmp_path, 6), minilm, tmp_path / "new", progress=False)
    (tmp_path / "new" / "contents.bin").write_bytes(b"x" * 10)
    with pytest.raises(CorpusIndexError, match="checksum of contents.bin does not match"):
        CorpusIndex.load(tmp_path / "new")


def test_a_resumed_build_gives_twins_their_first_copys_row_from_a_saved_shard(tmp_path, minilm, monkeypatch):
    """Killed after two shards and resumed: the later copies take their rows from the shards saved before the kill,
    and the index ends byte-identical to an uninterrupted build (texts included)."""
    from grape_rewards.demo import data_path

    texts = [json.loads(line)["text"] for line in data_path("captions.jsonl").read_text().splitlines()][:40]
    rows = [{"id": f"t{i}", "text": c} for i, c in enumerate(texts)]
    rows += [{"id": f"copy{i}", "text": c} for i, c in reversed(list(enumerate(texts)))]
    source = read_source(write_jsonl(tmp_path / "twins.jsonl", rows))
    build_index(source, minilm, tmp_path / "ref", batch_size=8, shard_size=20, progress=False)

    build_killed_after_two_shards(source, minilm, tmp_path / "idx", batch_size=8, shard_size=20)
    encoded: list[str] = []
    real = minilm.encode_texts
    monkeypatch.setattr(minilm, "encode_texts", lambda texts, batch_size=256: encoded.extend(texts) or real(
        texts, batch_size=batch_size))
    index = build_index(source, minilm, tmp_path / "idx", batch_size=8, shard_size=20, progress=False)
    assert encoded == []  # the first two shards held every first copy: the last two only copy rows
    for name in ("embeddings.safetensors", "ids.json", "contents.bin", "contents-offsets.safetensors"):
        assert (tmp_path / "idx" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert all(torch.equal(index.vectors([f"t{i}"]), index.vectors([f"copy{i}"])) for i in range(len(texts)))

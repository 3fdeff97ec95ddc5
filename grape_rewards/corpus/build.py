"""Building an index: batched encoding with a progress bar, resumable, written atomically.

The corpus is cut into shards of ``shard_size`` items. Each finished shard is written to
``<out>.partial/`` (atomically, then its sha256 beside it), so a killed build resumes at the first missing
shard; a saved shard whose checksum is missing or does not match is encoded again; shards are
encoded the same way whether or not the build was interrupted, so a resumed build ends byte-identical
to an uninterrupted one. The finished index is assembled in the staging folder and renamed into place:
``<out>`` either holds a complete index or does not exist. A text corpus's index also keeps each item's text
(:mod:`.contents`), what ``/retrieve`` answers as a document's contents.

Items of identical content (the same text; image files of the same bytes) are encoded once and share that
embedding, bit for bit: an encoder's float rounding depends on the batch an item is in, and a duplicate
embedded a last bit closer to a query than its twin would outrank it although the rank counts ties for the
target.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._version import __version__
from ..retrievers.base import Retriever, load_image
from .contents import CONTENT_FILES, write_contents
from .files import atomic_write, atomic_write_bytes, atomic_write_json, replace_folder, sha256_file
from .index import EMBEDDINGS, IDS, INDEX_FORMAT, INDEX_VERSION, MANIFEST, CorpusIndex, read_manifest
from .source import CorpusSource, CorpusSourceError

logger = logging.getLogger(__name__)
STATE = "state.json"
STAGING_VERSION = 2
"""Version of the staging folder's shards (2: duplicates share their first copy's embedding); a staging folder of
another version is encoded again."""


def _shard_file(staging: Path, shard: int) -> Path:
    return staging / f"shard-{shard:06d}.safetensors"


def _checksum_file(shard_file: Path) -> Path:
    return shard_file.with_name(shard_file.name + ".sha256")


def _load_shard(path: Path, expected_rows: int, dim: int) -> torch.Tensor | None:
    """A saved shard, if it is exactly what was saved (its checksum, written after it, agrees) and of the right
    shape; else None (it is encoded again)."""
    checksum = _checksum_file(path)
    if not path.is_file() or not checksum.is_file():
        return None
    if checksum.read_text(encoding="utf-8").strip() != sha256_file(path):
        logger.warning("%s does not match its checksum: encoding it again", path)
        return None
    try:
        emb = load_file(str(path))["embeddings"]
    except Exception:
        return None
    return emb if emb.shape == (expected_rows, dim) else None


def _save_shard(path: Path, embeddings: torch.Tensor) -> None:
    """Save a shard atomically, then its checksum (a shard without one is not reused)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"embeddings": embeddings.contiguous()}, str(tmp))
    os.replace(tmp, path)
    atomic_write_bytes(_checksum_file(path), (sha256_file(path) + "\n").encode("utf-8"))


def first_copies(source: CorpusSource) -> list[int]:
    """For each item, the row of the first item of identical content (its own row when it is the first): the same
    text, or image files of the same bytes (only files whose sizes collide are read and hashed).

    >>> first_copies(CorpusSource(["a", "b", "c", "d"], ["x", "y", "x", "x"], "text"))
    [0, 1, 0, 0]
    """
    if source.modality == "text":
        keys: Sequence[object] = source.items
    else:
        sizes = [os.stat(path).st_size for path in source.items]
        count: dict[int, int] = {}
        for size in sizes:
            count[size] = count.get(size, 0) + 1
        keys = [(size, sha256_file(path) if count[size] > 1 else path) for size, path in zip(sizes, source.items)]
    first: dict[object, int] = {}
    return [first.setdefault(key, row) for row, key in enumerate(keys)]


def _encode_shard(retriever: Retriever, source: CorpusSource, start: int, end: int, batch_size: int,
                  pool: ThreadPoolExecutor | None, progress: tqdm, first: Sequence[int],
                  earlier: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The float16 embeddings of rows ``start:end``: each first copy encoded (in batches of first copies), each
    later copy given its first copy's row (from this shard, or ``earlier(row)`` from a saved shard)."""
    out = torch.empty(end - start, retriever.dim, dtype=torch.float16)
    unique = [row for row in range(start, end) if first[row] == row]
    for b in range(0, len(unique), batch_size):
        rows = unique[b:b + batch_size]
        ids, items = [source.ids[r] for r in rows], [source.items[r] for r in rows]
        if source.modality == "image":
            loaded = list(pool.map(_load_or_explain, zip(ids, items))) if pool else [
                _load_or_explain(x) for x in zip(ids, items)]
            emb = retriever.encode_images(loaded, batch_size=batch_size)
        else:
            emb = retriever.encode_texts(items, batch_size=batch_size)
        out[torch.tensor(rows) - start] = emb.to("cpu", torch.float16)
        progress.update(len(rows))
    for row in range(start, end):
        src = first[row]
        if src != row:
            out[row - start] = out[src - start] if src >= start else earlier(src)
    progress.update(end - start - len(unique))
    return out


def _load_or_explain(pair: tuple[str, str]) -> Image.Image:
    item_id, path = pair
    try:
        return load_image(path)
    except (OSError, ValueError) as exc:
        raise CorpusSourceError(f"corpus item {item_id!r}: {exc}") from None


def build_index(
    source: CorpusSource,
    retriever: Retriever,
    out_dir: str | Path,
    batch_size: int = 64,
    shard_size: int = 4096,
    overwrite: bool = False,
    num_workers: int = 4,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> CorpusIndex:
    """Encode ``source`` with ``retriever`` into an index folder at ``out_dir`` and return it loaded.

    Args:
        shard_size: items per resumable unit of work.
        overwrite: replace an existing index at ``out_dir`` (atomically, once the new one is complete).
        num_workers: threads decoding images ahead of the encoder.
        on_shard: called with each shard number after it is saved (used by tests to interrupt a build).
    """
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds an index; replace it with overwrite=True "
                              "(--overwrite on the command line)")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not an index; choose an empty or new folder")
    if source.modality != retriever.corpus_modality:
        raise CorpusSourceError(f"{source.origin}: a corpus of {source.modality} items cannot be embedded by "
                                f"{retriever.spec!r}, which embeds {retriever.corpus_modality} corpora")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    staging = out.with_name(out.name + ".partial")
    state = {"source": source.digest, "fingerprint": retriever.fingerprint, "count": len(source),
             "dim": retriever.dim, "shard_size": shard_size, "batch_size": batch_size, "staging": STAGING_VERSION}
    state_file = staging / STATE
    if staging.exists():
        try:
            previous = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != state:
            logger.warning("discarding the interrupted build in %s: it was for another source, retriever or "
                           "batching", staging)
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_file, state)

    num_shards = (len(source) + shard_size - 1) // shard_size
    done: dict[int, torch.Tensor] = {}
    for shard in range(num_shards):
        rows = min(shard_size, len(source) - shard * shard_size)
        cached = _load_shard(_shard_file(staging, shard), rows, retriever.dim)
        if cached is not None:
            done[shard] = cached
    if done:
        logger.info("resuming %s: %d of %d shards already encoded", out, len(done), num_shards)
    first = first_copies(source)
    pool = ThreadPoolExecutor(max_workers=num_workers) if source.modality == "image" and num_workers > 0 else None
    try:
        with tqdm(total=len(source), desc=f"index {out.name}", unit="item", disable=not progress) as bar:
            bar.update(sum(t.shape[0] for t in done.values()))
            for shard in range(num_shards):
                if shard in done:
                    continue
                start, end = shard * shard_size, min((shard + 1) * shard_size, len(source))
                emb = _encode_shard(retriever, source, start, end, batch_size, pool, bar, first,
                                    lambda row: done[row // shard_size][row % shard_size])
                _save_shard(_shard_file(staging, shard), emb)
                done[shard] = emb
                if on_shard is not None:
                    on_shard(shard)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    embeddings = torch.cat([done[s] for s in range(num_shards)])
    final = staging / "index"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    atomic_write(final / EMBEDDINGS, lambda tmp: save_file({"embeddings": embeddings.contiguous()}, str(tmp)))
    atomic_write_bytes(final / IDS, json.dumps(source.ids, ensure_ascii=False).encode("utf-8"))
    contents = source.contents()
    if contents is not None:
        write_contents(final, contents)
    written = (EMBEDDINGS, IDS, *(CONTENT_FILES if contents is not None else ()))
    manifest = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "retriever": retriever.describe(),
        "dim": retriever.dim,
        "count": len(source),
        "dtype": "float16",
        "modality": source.modality,
        "checksums": {name: sha256_file(final / name) for name in written},
        "source": {"origin": source.origin, "sha256": source.digest},
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "grape_rewards_version": __version__,
    }
    atomic_write_json(final / MANIFEST, manifest)
    replace_folder(final, out)
    shutil.rmtree(staging, ignore_errors=True)
    return CorpusIndex.load(out, expected_fingerprint=retriever.fingerprint)


def index_info(path: str | Path) -> dict:
    """The manifest of an index folder."""
    return read_manifest(path)

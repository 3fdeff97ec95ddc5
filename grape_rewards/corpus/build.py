"""Building an index: batched encoding with a progress bar, resumable, written atomically.

The corpus is cut into shards of ``shard_size`` items. Each finished shard is written to
``<out>.partial/`` (atomically, then its sha256 beside it), so a killed build resumes at the first missing
shard; a saved shard whose checksum is missing or does not match is encoded again; shards are
encoded the same way whether or not the build was interrupted, so a resumed build ends byte-identical
to an uninterrupted one. The finished index is assembled in the staging folder and renamed into place:
``<out>`` either holds a complete index or does not exist.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._version import __version__
from ..retrievers.base import Retriever, load_image
from .files import atomic_write, atomic_write_bytes, atomic_write_json, replace_folder, sha256_file
from .index import EMBEDDINGS, IDS, INDEX_FORMAT, INDEX_VERSION, MANIFEST, CorpusIndex, read_manifest
from .source import CorpusSource, CorpusSourceError

logger = logging.getLogger(__name__)
STATE = "state.json"


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


def _encode_shard(retriever: Retriever, source: CorpusSource, start: int, end: int, batch_size: int,
                  pool: ThreadPoolExecutor | None, progress: tqdm) -> torch.Tensor:
    chunks = []
    for b in range(start, end, batch_size):
        ids, items = source.ids[b:min(b + batch_size, end)], source.items[b:min(b + batch_size, end)]
        if source.modality == "image":
            loaded = list(pool.map(_load_or_explain, zip(ids, items))) if pool else [
                _load_or_explain(x) for x in zip(ids, items)]
            emb = retriever.encode_images(loaded, batch_size=batch_size)
        else:
            emb = retriever.encode_texts(items, batch_size=batch_size)
        chunks.append(emb.to("cpu", torch.float16))
        progress.update(len(ids))
    return torch.cat(chunks)


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
        raise FileExistsError(f"{out} already holds an index; pass --overwrite to replace it")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not an index; choose an empty or new folder")
    if source.modality != retriever.corpus_modality:
        raise CorpusSourceError(f"{source.origin}: a corpus of {source.modality} items cannot be embedded by "
                                f"{retriever.spec!r}, which embeds {retriever.corpus_modality} corpora")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    staging = out.with_name(out.name + ".partial")
    state = {"source": source.digest, "fingerprint": retriever.fingerprint, "count": len(source),
             "dim": retriever.dim, "shard_size": shard_size, "batch_size": batch_size}
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
    pool = ThreadPoolExecutor(max_workers=num_workers) if source.modality == "image" and num_workers > 0 else None
    try:
        with tqdm(total=len(source), desc=f"index {out.name}", unit="item", disable=not progress) as bar:
            bar.update(sum(t.shape[0] for t in done.values()))
            for shard in range(num_shards):
                if shard in done:
                    continue
                start, end = shard * shard_size, min((shard + 1) * shard_size, len(source))
                emb = _encode_shard(retriever, source, start, end, batch_size, pool, bar)
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
    manifest = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "retriever": retriever.describe(),
        "dim": retriever.dim,
        "count": len(source),
        "dtype": "float16",
        "modality": source.modality,
        "checksums": {EMBEDDINGS: sha256_file(final / EMBEDDINGS), IDS: sha256_file(final / IDS)},
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

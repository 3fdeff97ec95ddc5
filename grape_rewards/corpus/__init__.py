"""The embedded corpus: sources, resumable index builds, loading with checks, exact rank and top-k search."""

from .build import build_index, index_info
from .index import CorpusIndex, IndexError_, UnknownIdError, read_manifest
from .search import build_searcher, faiss_available, torch_topk
from .source import CorpusSource, CorpusSourceError, read_image_folder, read_source
from .source import read_manifest as read_source_manifest

__all__ = [
    "CorpusIndex", "CorpusSource", "CorpusSourceError", "IndexError_", "UnknownIdError", "build_index",
    "build_searcher", "faiss_available", "index_info", "read_image_folder", "read_manifest", "read_source",
    "read_source_manifest", "torch_topk",
]

"""The embedded corpus: sources, resumable index builds, loading with checks, exact rank and top-k search."""

from .build import build_index, index_info
from .index import CorpusIndex, CorpusIndexError, UnknownIdError, read_manifest
from .rank import (
    CUDA_CHUNK_ELEMENTS,
    DEFAULT_CHUNK_ELEMENTS,
    NO_EXTRAS,
    RankStats,
    ScanCounts,
    ScanExtras,
    chunk_rows,
    column_sums,
    corpus_rank,
    default_chunk_elements,
    finish_rank,
    merge_counts,
    scan_counts,
    target_scores,
)
from .search import build_searcher, faiss_available, torch_topk
from .source import CorpusSource, CorpusSourceError, read_image_folder, read_source, read_source_manifest

__all__ = [
    "CUDA_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS",
    "NO_EXTRAS",
    "CorpusIndex",
    "CorpusIndexError",
    "CorpusSource",
    "CorpusSourceError",
    "RankStats",
    "ScanCounts",
    "ScanExtras",
    "UnknownIdError",
    "build_index",
    "build_searcher",
    "chunk_rows",
    "column_sums",
    "corpus_rank",
    "default_chunk_elements",
    "faiss_available",
    "finish_rank",
    "index_info",
    "merge_counts",
    "read_image_folder",
    "read_manifest",
    "read_source",
    "read_source_manifest",
    "scan_counts",
    "target_scores",
    "torch_topk",
]

"""Benchmark loaders: each release's own file layout, streamed into one schema (corpus items + queries)."""

from .cirr import CIRR
from .cvlue import CVLUE
from .flickr30k_cn import Flickr30kCN
from .registry import BENCHMARKS, DEFAULT_SPLITS, load_benchmark
from .schema import TASKS, Benchmark, CorpusItem, DataFormatError, Query, Task
from .wiki_longform import WikiLongform, wit_image_filename
from .xm3600 import XM3600

__all__ = [
    "BENCHMARKS", "CIRR", "CVLUE", "DEFAULT_SPLITS", "TASKS", "XM3600", "Benchmark", "CorpusItem", "DataFormatError",
    "Flickr30kCN", "Query", "Task", "WikiLongform", "load_benchmark", "wit_image_filename",
]

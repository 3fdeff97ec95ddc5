"""Benchmark loaders by name: ``load_benchmark("cirr", "/data/cirr", split="val")``."""

from __future__ import annotations

from typing import Any

from .cirr import CIRR
from .cvlue import CVLUE
from .flickr30k_cn import Flickr30kCN
from .schema import Benchmark, PathLike
from .wiki_longform import WikiLongform
from .xm3600 import XM3600

BENCHMARKS: dict[str, type[Benchmark]] = {
    "flickr30k-cn": Flickr30kCN,
    "cvlue": CVLUE,
    "xm3600": XM3600,
    "wiki-longform": WikiLongform,
    "cirr": CIRR,
}
"""Registry name -> loader class."""

DEFAULT_SPLITS: dict[str, str] = {
    "flickr30k-cn": "test",
    "cvlue": "val",
    "xm3600": "test",
    "wiki-longform": "test",
    "cirr": "val",
}
"""The split each benchmark loads when none is given (its labelled evaluation split)."""


def load_benchmark(name: str, root: PathLike, split: str | None = None, **kwargs: Any) -> Benchmark:
    """Build the loader registered as ``name`` over the release files under ``root``.

    ``split`` defaults to :data:`DEFAULT_SPLITS` ``[name]``; ``kwargs`` go to the loader's constructor
    (e.g. ``language="en"`` for XM3600, ``image_root=...`` for CIRR).

    >>> load_benchmark("imagenet", "/data")
    Traceback (most recent call last):
    ...
    ValueError: unknown benchmark 'imagenet'; known: cirr, cvlue, flickr30k-cn, wiki-longform, xm3600
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name](root, split if split is not None else DEFAULT_SPLITS[name], **kwargs)

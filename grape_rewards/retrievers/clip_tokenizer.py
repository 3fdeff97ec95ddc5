r"""open_clip's CLIP tokenizer, token for token, without its per-text Python cost on plain text.

open_clip's ``SimpleTokenizer`` cleans every text with ftfy and splits it with the ``regex`` module before its
byte-pair encoding, per text in Python: on a GPU, tokenizing a GRPO step's rewrites on the host can cost more than
encoding and ranking them (measured: docs/shortcuts.md). :class:`FastCLIPTokenizer` gives the same ids at a
fraction of the cost, in two exact steps:

- Cleaning: a text of printable ASCII (tabs and line breaks allowed) without ``&`` is left alone by ftfy and
  ``html.unescape``, so open_clip's ``lower`` cleaning reduces to collapsing whitespace and lower-casing; any
  other text goes through open_clip's own cleaning function.
- Encoding: a cleaned text of printable ASCII is split by open_clip's pattern restricted to ASCII (where
  ``\p{L}`` is ``[a-zA-Z]``, ``\p{N}`` is ``[0-9]`` and the only whitespace left is the space), and each word's
  ids come from a word cache filled by open_clip's own ``bpe``; in printable ASCII the byte-to-unicode map is the
  identity, so a word is its own byte-level form. Any other text (Chinese, accents, emoji) and any text naming
  a special token goes through open_clip's own ``encode``.

Tests assert equality with ``SimpleTokenizer`` on fixed and generated texts. :func:`fast_clip_tokenizer` returns
None for tokenizers it cannot mirror exactly (other cleaning modes, reduction masks, HF-backed tokenizers).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

_PLAIN_ASCII = re.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")
"""Texts that ftfy and html.unescape leave unchanged: printable ASCII, tabs and line breaks, no ``&``."""

_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_ASCII_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[a-zA-Z]+|[0-9]|[^ a-zA-Z0-9]+""")
"""open_clip's split pattern on printable ASCII (its special tokens aside: texts naming one take the slow path)."""

WORD_CACHE_SIZE = 262_144
"""Most words whose ids are kept (the cache is emptied when full; GRPO rewrites reuse a small vocabulary)."""


def clean_lower(text: str, slow_clean: Any) -> str:
    """open_clip's ``lower`` cleaning (ftfy, HTML unescape, whitespace collapse, lower case), fast for plain text.

    >>> from open_clip.tokenizer import _clean_lower
    >>> clean_lower("  A Dog\\n on the  BEACH ", _clean_lower)
    'a dog on the beach'
    >>> clean_lower("Fish &amp; chips", _clean_lower)
    'fish & chips'
    """
    if _PLAIN_ASCII.fullmatch(text):
        return " ".join(text.split()).lower()
    return slow_clean(text)


class FastCLIPTokenizer:
    """The ids of open_clip's ``SimpleTokenizer`` (``clean="lower"``, no reduction mask), computed faster.

    Args:
        tokenizer: the open_clip ``SimpleTokenizer`` to mirror; its vocabulary, merges and specials are reused.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.slow = tokenizer
        self.context_length = int(tokenizer.context_length or 77)
        self.sot = int(tokenizer.sot_token_id)
        self.eot = int(tokenizer.eot_token_id)
        special_ids = set(tokenizer.all_special_ids)
        self.specials = [tok for tok, i in tokenizer.encoder.items() if i in special_ids]
        self._words: dict[str, list[int]] = {}

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's full id list: start token, the text's ids (never truncated), end token."""
        # One flat loop with local names: this runs for every rewrite of every step.
        printable, split = _PRINTABLE_ASCII.fullmatch, _ASCII_SPLIT.findall
        words, slow, specials, sot, eot = self._words, self.slow, self.specials, self.sot, self.eot
        out = []
        for text in texts:
            cleaned = clean_lower(text, slow.clean_fn)
            if not printable(cleaned) or ("<" in cleaned and any(s in cleaned for s in specials)):
                out.append([sot, *slow.encode(text), eot])
                continue
            ids = [sot]
            for word in split(cleaned):
                word_ids = words.get(word)
                if word_ids is None:
                    word_ids = self._word_ids(word)
                ids += word_ids
            ids.append(eot)
            out.append(ids)
        return out

    def _word_ids(self, word: str) -> list[int]:
        """open_clip's BPE of one ASCII word (its own byte-level form), cached."""
        if len(self._words) >= WORD_CACHE_SIZE:
            self._words.clear()
        encoder = self.slow.encoder
        ids = self._words[word] = [encoder[t] for t in self.slow.bpe(word).split(" ")]
        return ids

    def pack(self, ids: Sequence[Sequence[int]], context_length: int | None = None) -> torch.Tensor:
        """Ids as open_clip's (n, context_length) tensor: zero-padded; too long ones cut, ending in the end token."""
        ctx = context_length or self.context_length
        rows = [seq if len(seq) <= ctx else [*seq[:ctx - 1], self.eot] for seq in ids]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        out = np.zeros((len(rows), ctx), dtype=np.int64)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # each token's row start in ``flat``
        out[np.repeat(np.arange(len(rows)), lengths), np.arange(len(flat)) - starts] = flat
        return torch.from_numpy(out)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Drop-in for ``SimpleTokenizer.__call__``."""
        return self.pack(self.encode([texts] if isinstance(texts, str) else texts), context_length)


def fast_clip_tokenizer(tokenizer: Any) -> FastCLIPTokenizer | None:
    """A :class:`FastCLIPTokenizer` mirroring ``tokenizer``, or None where it cannot be exact."""
    from open_clip.tokenizer import SimpleTokenizer, _clean_lower

    if type(tokenizer) is not SimpleTokenizer or tokenizer.clean_fn is not _clean_lower:
        return None
    if getattr(tokenizer, "reduction_fn", None) is not None:
        return None
    return FastCLIPTokenizer(tokenizer)

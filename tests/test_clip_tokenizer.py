"""The fast CLIP tokenizer gives open_clip's ids exactly: fixed edge cases, generated ASCII and Unicode texts,
truncation at the context length, and the retriever's tokenize-once path. No network: open_clip ships its BPE."""

from __future__ import annotations

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.tokenizer import SimpleTokenizer, _clean_lower

from grape_rewards.retrievers.clip_tokenizer import WORD_CACHE_SIZE, FastCLIPTokenizer, clean_lower, fast_clip_tokenizer

EDGE_TEXTS = [
    "a dog", "", "   ", "A Photo OF a DOG", "it's a dog's life, isn't it? they'll've", "IT'S LOUD", "12345 apples",
    "!~x", "x!!!y", "a&b &amp; c &lt;tag&gt;", "tab\there\r\nnew\rline", "under_score-dash.dot/slash\\back",
    "<start_of_text> hi <end_of_text>", "<b>bold</b>", "Ünïcödé café", "一只狗在草地上", "emoji 🐶🐕 dog",
    "ＦＵＬＬ width", "\x00ctrl\x1b[31mred\x7f", "l'été", "e\u0301", "naïve coöperate", "“curly” ‘quotes’",
    "word " * 120, "supercalifragilisticexpialidocious", "a" * 300, "\x0b\x0c\x1c\x1f spaces",
]


@pytest.fixture(scope="module")
def slow() -> SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def fast(slow) -> FastCLIPTokenizer:
    tok = fast_clip_tokenizer(slow)
    assert tok is not None
    return tok


def test_edge_texts_match_open_clip(slow, fast):
    assert torch.equal(fast(EDGE_TEXTS), slow(EDGE_TEXTS))
    assert [len(ids) for ids in fast.encode(EDGE_TEXTS)] == [len(slow.encode(t)) + 2 for t in EDGE_TEXTS]


def test_truncation_matches_open_clip(slow, fast):
    texts = [" ".join(["a"] * n) for n in (74, 75, 76, 200)]
    assert torch.equal(fast(texts), slow(texts))
    assert torch.equal(fast(texts, context_length=16), slow(texts, context_length=16))
    assert fast(texts)[-1, -1].item() == slow.eot_token_id
    assert fast([]).shape == (0, 77)


_plain = st.text(alphabet=st.characters(min_codepoint=9, max_codepoint=126), max_size=80)
_mixed = st.text(max_size=40)
_wordy = st.lists(st.sampled_from(["dog", "'s", "'LL", "&amp;", "&", "!~", "x", "42", " ", "\t", "é", "狗",
                                   "<end_of_text>",
                                   "Café", "\r\n", "_", "..."]), max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.one_of(_plain, _mixed, _wordy), min_size=1, max_size=8))
def test_generated_texts_match_open_clip(slow, fast, texts):
    assert torch.equal(fast(texts), slow(texts))


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(_plain, _wordy))
def test_clean_lower_is_open_clips_cleaning(text):
    assert clean_lower(text, _clean_lower) == _clean_lower(text)


def test_word_cache_is_bounded(slow, monkeypatch):
    import grape_rewards.retrievers.clip_tokenizer as module

    monkeypatch.setattr(module, "WORD_CACHE_SIZE", 3)
    tok = FastCLIPTokenizer(slow)
    texts = ["alpha beta gamma delta epsilon", "zeta eta theta"]
    assert torch.equal(tok(texts), slow(texts))
    assert len(tok._words) <= 3
    assert WORD_CACHE_SIZE > 100_000


def test_only_exactly_mirrorable_tokenizers_are_wrapped():
    assert fast_clip_tokenizer(SimpleTokenizer(clean="whitespace")) is None
    assert fast_clip_tokenizer(SimpleTokenizer(reduction_mask="simple")) is None
    assert fast_clip_tokenizer(object()) is None
    assert fast_clip_tokenizer(SimpleTokenizer(context_length=32)).context_length == 32


def test_retriever_tokenizes_once_with_the_same_results(tiny_open_clip, monkeypatch):
    texts = ["a dog on the grass", "word " * 100, "", "一只猫", "a dog on the grass"]
    want_emb, want_info = tiny_open_clip.encode_texts(texts), tiny_open_clip.text_info(texts)
    calls = []
    real = tiny_open_clip.fast_tokenizer.encode
    monkeypatch.setattr(tiny_open_clip.fast_tokenizer, "encode", lambda ts: calls.append(len(ts)) or real(ts))
    emb, info = tiny_open_clip.encode_texts_with_info(texts)
    assert calls == [len(texts)]
    assert torch.equal(emb, want_emb) and info == want_info
    assert [i.truncated for i in info] == [False, True, False, False, False]
    slow_counts = [len(tiny_open_clip.tokenizer.encode(t)) + 2 for t in texts]
    assert [i.num_tokens for i in info] == slow_counts

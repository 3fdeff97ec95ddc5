"""Extract the rewrite from a model's completion, and judge its format.

A completion may carry chat special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``,
``<|eot_id|>``, ``</s>`` ...), a reasoning block (``<think> ... </think>``) and the answer in tags
(``<answer> ... </answer>``). The rewrite is, in order of preference: the content of the last
complete answer tag pair; the text after the last closed reasoning block; the whole response.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

FormatStatus = Literal["ok", "empty", "missing", "overlong"]

# <|im_start|>, <|im_end|>, <|endoftext|>, <|eot_id|>, <|start_header_id|>, <|vision_pad|> ...
_PIPE_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>")
_PLAIN_TOKENS = re.compile(r"</s>|<s>|<pad>|<unk>|<eos>|<bos>|<start_of_turn>|<end_of_turn>|\[PAD\]|\[CLS\]|\[SEP\]")
# Headers that open the assistant turn, newest chat formats first. The text after the last one
# is the response, which is how a VLM prompt whose image placeholder was expanded is split.
_ASSISTANT_HEADERS = (
    re.compile(r"<\|im_start\|>\s*assistant\s*\n?"),  # Qwen / ChatML
    re.compile(r"<\|start_header_id\|>\s*assistant\s*<\|end_header_id\|>\s*"),  # Llama 3
    re.compile(r"<\|assistant\|>\s*"),  # Phi-3
    re.compile(r"<start_of_turn>\s*model\s*\n?"),  # Gemma
)


def strip_special_tokens(text: str) -> str:
    """Remove chat special tokens and surrounding whitespace.

    >>> strip_special_tokens("a red car<|im_end|>\\n<|endoftext|>")
    'a red car'
    """
    text = _PIPE_TOKEN.sub("", text)
    text = _PLAIN_TOKENS.sub("", text)
    return text.strip()


def response_from_query(query: str, prompt: str | None = None) -> str:
    """Recover the response from OpenRLHF's ``query`` (templated prompt + response, special tokens kept).

    Tries, in order: the prompt as a prefix; the text after the last assistant header (works when the
    image placeholder in a VLM prompt was expanded into pad tokens); the whole string.

    >>> q = "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n<answer>a dog</answer><|im_end|>"
    >>> response_from_query(q, "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n")
    '<answer>a dog</answer><|im_end|>'
    >>> response_from_query(q, "<|im_start|>user\\n<|image_pad|>hi<|im_end|>\\n<|im_start|>assistant\\n")
    '<answer>a dog</answer><|im_end|>'
    """
    if prompt and query.startswith(prompt):
        return query[len(prompt):]
    for header in _ASSISTANT_HEADERS:
        matches = list(header.finditer(query))
        if matches:
            return query[matches[-1].end():]
    return query


@dataclass(frozen=True)
class Extraction:
    """The rewrite found in a completion, and whether its format is acceptable."""

    text: str
    status: FormatStatus

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def scorable(self) -> bool:
        """Whether there is a rewrite to retrieve with (overlong ones are still scored)."""
        return self.status in ("ok", "overlong")


@functools.lru_cache(maxsize=16)
def _answer_pattern(answer_tag: str) -> re.Pattern[str]:
    """``<tag>(.*?)</tag>`` across lines, compiled once per tag (this runs for every sample)."""
    return re.compile(re.escape(f"<{answer_tag}>") + r"(.*?)" + re.escape(f"</{answer_tag}>"), flags=re.DOTALL)


def extract_rewrite(
    completion: str | None,
    answer_tag: str = "answer",
    require_answer_tag: bool = False,
    max_chars: int = 1000,
) -> Extraction:
    """Pull the rewrite out of a completion.

    Status ``missing``: the answer tag (when required) or the end of a reasoning block is absent, or an
    answer tag was opened and never closed. ``empty``: nothing left after stripping. ``overlong``:
    more than ``max_chars`` characters (the text is returned whole; the retriever truncates it).

    >>> extract_rewrite("<think>it is Chinese</think><answer> a dog on grass </answer><|im_end|>")
    Extraction(text='a dog on grass', status='ok')
    >>> extract_rewrite("<think>hmm</think>\\nA dog on grass.")
    Extraction(text='A dog on grass.', status='ok')
    >>> extract_rewrite("<think>still thinking")
    Extraction(text='', status='missing')
    >>> extract_rewrite("<answer></answer>").status
    'empty'
    """
    if completion is None:
        return Extraction("", "missing")
    text = strip_special_tokens(completion)
    open_tag = f"<{answer_tag}>"
    answers = _answer_pattern(answer_tag).findall(text)
    if answers:
        text = answers[-1]
    elif open_tag in text or require_answer_tag:
        return Extraction("", "missing")
    elif "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        return Extraction("", "missing")
    text = text.strip().strip("\"'“”").strip()
    if not text:
        return Extraction("", "empty")
    if len(text) > max_chars:
        return Extraction(text, "overlong")
    return Extraction(text, "ok")

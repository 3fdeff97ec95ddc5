"""Prompt templates of the query-rewriting task, one per benchmark task, as chat messages.

The rewriter reads a query that a frozen retriever (CLIP, or a text embedder) handles badly and writes one it
handles well:

- ``multilingual``: a non-English caption -> an English, CLIP-style caption of the same image;
- ``longform``: a long passage -> a concise caption that fits a 77-token text encoder;
- ``composed``: a reference image + a modification text -> a description of the target image;
- ``text``: a query for a text retriever (any language, long or vague) -> a concise English search query for the
  passage it looks for (the task of a text corpus).

Every template asks for the rewrite inside ``<answer></answer>`` tags, which
:func:`grape_rewards.rewards.extract_rewrite` reads back. The same messages serve evaluation
(``grape-rewards rewrite``) and training data, so they are plain data: a system message and a user
message, the user content a string, or, with an image, a list of parts in the transformers /
OpenRLHF layout ``[{"type": "image"}, {"type": "text", "text": ...}]``.

>>> messages = build_messages("multilingual", "一只狗在草地上奔跑", language="zh")
>>> [m["role"] for m in messages]
['system', 'user']
>>> "Chinese" in messages[1]["content"] and "<answer>" in messages[0]["content"]
True
>>> build_messages("composed", "make the dog smaller", with_image=True)[1]["content"][0]
{'type': 'image'}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
"""The tags around the rewrite (the default ``answer_tag`` of :func:`grape_rewards.rewards.extract_rewrite`)."""

LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic", "bn": "Bengali", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek",
    "en": "English", "es": "Spanish", "fa": "Persian", "fi": "Finnish", "fil": "Filipino", "fr": "French",
    "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "id": "Indonesian", "it": "Italian",
    "ja": "Japanese", "ko": "Korean", "mi": "Maori", "nl": "Dutch", "no": "Norwegian", "pl": "Polish",
    "pt": "Portuguese", "quz": "Quechua", "ro": "Romanian", "ru": "Russian", "sv": "Swedish", "sw": "Swahili",
    "te": "Telugu", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese",
}
"""Language codes of the benchmarks (XM3600's 36, Chinese for Flickr30k-CN and CVLUE) -> English names."""


@dataclass(frozen=True)
class TaskPrompt:
    """The two templates of one task. ``user`` is formatted with ``query`` and ``language``;
    ``user_with_image`` (when set) replaces it when an image is attached to the message."""

    system: str
    user: str
    user_with_image: str | None = None


_FORMAT = (f"Think briefly if you need to, then write only the rewritten query between {ANSWER_OPEN} and "
           f"{ANSWER_CLOSE}, for example: {ANSWER_OPEN}a brown dog running across a grassy field{ANSWER_CLOSE}")

TASK_PROMPTS: dict[str, TaskPrompt] = {
    "multilingual": TaskPrompt(
        system=("You rewrite image-search queries for an English CLIP text encoder. Given a caption in another "
                "language, write an English caption of the same image in the style of CLIP training captions: "
                "one short, concrete sentence naming the visible objects, their attributes, actions and the "
                "setting. Keep every visual detail of the original; add nothing that is not in it. " + _FORMAT),
        user="Caption ({language}):\n{query}",
    ),
    "longform": TaskPrompt(
        system=("You rewrite image-search queries for a CLIP text encoder that reads at most 77 tokens (about 50 "
                "English words). Given a long passage that accompanies an image, write one concise English "
                "caption of what the image most likely shows: the main subject, its visible attributes and the "
                "setting, in at most 40 words. Leave out history, dates, numbers and anything that cannot be "
                "seen. " + _FORMAT),
        user="Passage:\n{query}",
    ),
    "composed": TaskPrompt(
        system=("You rewrite composed image-search queries for a CLIP text encoder. A query is a reference image "
                "and a modification text; the target is the image that results from applying the modification "
                "to the reference. Write one short, concrete English caption of the target image: keep what the "
                "modification keeps from the reference, change what it changes, and describe the result, not "
                "the change. " + _FORMAT),
        user="The reference image is not shown; infer what you can from the text.\nModification: {query}",
        user_with_image="Reference image above.\nModification: {query}",
    ),
    "text": TaskPrompt(
        system=("You rewrite search queries for a text retriever, a sentence-embedding model that ranks a corpus "
                "of short English text passages by their similarity to the query. Given a query that may be in "
                "another language, long and rambling, or vague, write one short, specific English sentence saying "
                "what the passage it looks for says: its main subject, the action or facts, and the setting, in "
                "the words such a passage would use. Keep every detail the query gives; add nothing that is not "
                "in it. " + _FORMAT),
        user="Query ({language}):\n{query}",
    ),
}
"""Task name -> its templates (the tasks of :data:`grape_rewards.datasets.TASKS`)."""


def language_name(language: str | None) -> str:
    """The English name of a language code (the code itself when unknown; "the original language" for None).

    >>> language_name("zh"), language_name("xx"), language_name(None)
    ('Chinese', 'xx', 'the original language')
    """
    if not language:
        return "the original language"
    return LANGUAGE_NAMES.get(language.lower(), language)


def build_messages(task: str, query_text: str, language: str | None = None,
                   with_image: bool = False) -> list[dict[str, Any]]:
    """The chat messages asking the rewriter to rewrite ``query_text`` for ``task``.

    Args:
        task: ``multilingual``, ``longform``, ``composed`` or ``text`` (keys of :data:`TASK_PROMPTS`).
        query_text: the query (for ``composed``, the modification text).
        language: the query's language code (``zh``, ``ja`` ...), named in the multilingual and text prompts.
        with_image: put an image part before the text of the user message (the reference image of a
            composed query); the caller supplies the image itself to its backend.

    Returns:
        ``[{"role": "system", "content": str}, {"role": "user", "content": str | list[part]}]``.

    >>> build_messages("longform", "The Louvre is ...")[1]["content"]
    'Passage:\\nThe Louvre is ...'
    >>> build_messages("captioning", "x")
    Traceback (most recent call last):
    ...
    ValueError: unknown rewrite task 'captioning'; known: multilingual, longform, composed, text
    """
    if task not in TASK_PROMPTS:
        raise ValueError(f"unknown rewrite task {task!r}; known: {', '.join(TASK_PROMPTS)}")
    if not isinstance(query_text, str) or not query_text.strip():
        raise ValueError(f"the {task} query text is empty")
    prompt = TASK_PROMPTS[task]
    template = prompt.user_with_image if with_image and prompt.user_with_image else prompt.user
    text = template.format(query=query_text.strip(), language=language_name(language))
    content: str | list[dict[str, Any]]
    content = [{"type": "image"}, {"type": "text", "text": text}] if with_image else text
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": content}]


def merge_system_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold a leading system message into the first user message (for chat templates without a system role).

    >>> merge_system_message([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    [{'role': 'user', 'content': 'S\\n\\nU'}]
    """
    if not messages or messages[0].get("role") != "system" or len(messages) < 2:
        return list(messages)
    system, user, rest = messages[0]["content"], messages[1], messages[2:]
    content = user["content"]
    if isinstance(content, str):
        merged: str | list[dict[str, Any]] = f"{system}\n\n{content}"
    else:
        merged = [dict(p) for p in content]
        text_parts = [p for p in merged if p.get("type") == "text"]
        if text_parts:
            text_parts[0]["text"] = f"{system}\n\n{text_parts[0]['text']}"
        else:
            merged.append({"type": "text", "text": system})
    return [{**user, "content": merged}, *rest]


def plain_prompt(messages: list[dict[str, Any]]) -> str:
    """A prompt string for models without a chat template: the message texts, then ``Answer:``.

    >>> plain_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    'S\\n\\nU\\n\\nAnswer: '
    """
    texts = []
    for m in messages:
        content = m["content"]
        texts.append(content if isinstance(content, str) else
                     "\n".join(p["text"] for p in content if p.get("type") == "text"))
    return "\n\n".join(texts) + "\n\nAnswer: "

"""Rewrites for evaluation: task prompts, generation backends (transformers, vLLM, OpenAI-compatible HTTP) and a
resumable JSONL writer. ``grape-rewards rewrite`` drives them from the command line."""

from .backends import (
    BACKENDS,
    BackendOptions,
    GenerationRequest,
    Generator,
    OpenAIGenerator,
    SamplingConfig,
    TransformersGenerator,
    VLLMGenerator,
    create_generator,
    image_data_url,
    openai_messages,
)
from .prompts import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    LANGUAGE_NAMES,
    TASK_PROMPTS,
    TaskPrompt,
    build_messages,
    language_name,
    merge_system_message,
    plain_prompt,
)
from .runner import RewriteSummary, generate_rewrites, make_request, reference_images
from .store import FIELDS, RewriteFileError, RewriteWriter, read_rewrites, trim_partial_line

__all__ = [
    "ANSWER_CLOSE", "ANSWER_OPEN", "BACKENDS", "FIELDS", "LANGUAGE_NAMES", "TASK_PROMPTS", "BackendOptions",
    "GenerationRequest", "Generator", "OpenAIGenerator", "RewriteFileError", "RewriteSummary", "RewriteWriter",
    "SamplingConfig", "TaskPrompt", "TransformersGenerator", "VLLMGenerator", "build_messages", "create_generator",
    "generate_rewrites", "image_data_url", "language_name", "make_request", "merge_system_message",
    "openai_messages", "plain_prompt", "read_rewrites", "reference_images", "trim_partial_line",
]

"""``grape-rewards prepare``: training data for OpenRLHF (JSONL), verl (parquet) and TRL (JSONL), from a benchmark
loader or a JSONL of queries in the common schema, with the rewrite prompt templates of each task."""

from .rows import (
    ABILITY,
    TrainingQuery,
    chat_messages,
    label,
    label_json,
    openrlhf_row,
    queries_from_benchmark,
    read_queries_jsonl,
    trl_row,
    verl_row,
    with_targets,
)
from .write import FORMATS, PrepareSummary, write_jsonl, write_parquet, write_training_data

__all__ = [
    "ABILITY", "FORMATS", "PrepareSummary", "TrainingQuery", "chat_messages", "label", "label_json", "openrlhf_row",
    "queries_from_benchmark", "read_queries_jsonl", "trl_row", "verl_row", "with_targets", "write_jsonl",
    "write_parquet", "write_training_data",
]

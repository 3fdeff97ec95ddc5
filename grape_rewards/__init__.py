"""grape-rewards: corpus-relative rank rewards from a frozen retriever, for GRPO training of query rewriters."""

__version__ = "0.1.0"

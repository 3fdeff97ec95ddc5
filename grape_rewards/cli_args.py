"""Command-line arguments that several ``grape-rewards`` verbs share: the retriever and the reward settings.

Each verb's module (and :mod:`grape_rewards.cli`, which dispatches to them) imports these from here, so that no verb
imports the top-level CLI. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .retrievers import Retriever
    from .rewards import RewardConfig


class IndexListAction(argparse.Action):
    """``--index``, the same syntax in every command: one folder, several separated by commas, or the flag repeated
    (:func:`~grape_rewards.index_list.parse_index_list`); the folders gather in a list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from .index_list import parse_index_list

        try:
            folders = parse_index_list(str(values), option_string or "--index")
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *folders])


def add_retriever_args(p: argparse.ArgumentParser, required: bool = True, default: str | None = None) -> None:
    """``--retriever`` (a spec) and how to run it: ``--device``, ``--dtype``, ``--fusion``, ``--image-weight``."""
    p.add_argument("--retriever", required=required, default=default,
                   help="retriever spec: open_clip:ViT-B-32/openai, hf:<name or folder>, text:all-MiniLM-L6-v2, "
                        "composed:<spec>, a model folder, or random:<spec> (tests only)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="encoder precision (auto: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--fusion", choices=["text", "sum"], default="sum", help="composed retrieval: query fusion")
    p.add_argument("--image-weight", type=float, default=0.5, help="composed retrieval, sum fusion: image weight")


def add_reward_args(p: argparse.ArgumentParser) -> None:
    """``--reward-config`` (a YAML file) and the flags that override it: ``--shape``, ``--k``, ``--rank-mode``,
    ``--temperature``, ``--relative``, ``--preset``, ``--ensemble``."""
    from .rewards.graded_rank import RANK_MODES
    from .rewards.shapes import RANK_SHAPES

    p.add_argument("--reward-config", type=Path, help="YAML file of reward settings (RewardConfig fields)")
    p.add_argument("--shape", choices=RANK_SHAPES, help="rank shape")
    p.add_argument("--k", type=int, help="k of the recall@k shape")
    p.add_argument("--rank-mode", choices=RANK_MODES,
                   help="hard (the plain rank), margin (graded by the target's gaps to its neighbours) or soft")
    p.add_argument("--temperature", type=float, help="the similarity scale of the margin and soft rank modes")
    p.add_argument("--relative", action="store_true", help="reward the change against the original query's rank")
    p.add_argument("--preset", choices=["rank", "similarity"], help="rank (default) or the similarity baseline")
    p.add_argument("--ensemble", choices=["mean", "min"],
                   help="several indexes: the rank part is the mean (default) or the minimum of the retrievers'")


def reward_config_from_args(args: argparse.Namespace) -> RewardConfig:
    """The :class:`~grape_rewards.rewards.RewardConfig` of :func:`add_reward_args`' flags."""
    from .rewards import RewardConfig

    config = RewardConfig.from_yaml(args.reward_config) if args.reward_config else RewardConfig()
    if args.preset:
        config = RewardConfig.preset(args.preset, **config.model_dump(exclude={"weights"}))
    updates = {k: v for k, v in {"shape": args.shape, "k": args.k, "rank_mode": args.rank_mode,
                                 "temperature": args.temperature,
                                 "ensemble": getattr(args, "ensemble", None)}.items() if v is not None}
    if args.relative:
        updates["relative"] = True
    return RewardConfig.model_validate({**config.model_dump(), **updates})


def retriever_overrides(args: argparse.Namespace) -> dict[str, object]:
    """:func:`add_retriever_args`' settings as keyword overrides of ``create_retriever``."""
    return {"device": args.device, "dtype": args.dtype, "fusion": args.fusion, "image_weight": args.image_weight}


def retriever_from_args(args: argparse.Namespace, spec: str | None = None) -> Retriever:
    """The retriever ``spec`` (default ``--retriever``) names, run as :func:`add_retriever_args`' flags say."""
    from .retrievers import create_retriever

    return create_retriever(spec or args.retriever, **retriever_overrides(args))  # type: ignore[arg-type]

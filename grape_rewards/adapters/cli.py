"""``grape-rewards adapters``: where the framework adapters are, how to point a framework at them, and launch checks.

    grape-rewards adapters path openrlhf|verl          the installed path-loadable reward file
    grape-rewards adapters flags openrlhf|verl|trl     the flags (or code) that point the framework at the reward
    grape-rewards adapters check openrlhf -- ARGS...   validate train_ppo_ray flags with the installed OpenRLHF
    grape-rewards adapters check verl -- OVERRIDES...  compose and validate verl's Hydra config, load the reward

This module imports nothing heavy at module level (the CLI parser is built on every invocation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ADAPTER_FILES: dict[str, str] = {"openrlhf": "openrlhf/reward_func.py", "verl": "verl/reward_fn.py"}
"""Framework -> its path-loadable reward file, relative to the ``adapters/`` folder (installed as
``grape_rewards.adapters.files``)."""

DESCRIPTION = """\
Point OpenRLHF, verl or TRL at the reward, and check a launch command without GPUs.

  grape-rewards adapters flags openrlhf|verl|trl     the flags (or code) that point the framework at the reward
  grape-rewards adapters path openrlhf|verl          the installed reward file, for the frameworks' file modes
  grape-rewards adapters check openrlhf -- ARGS...   check train_ppo_ray flags with the installed OpenRLHF
  grape-rewards adapters check verl -- OVERRIDES...  check verl's config and load the reward the way verl will
"""

VERL_MODULE = "pkg://grape_rewards.adapters.verl"
DEFAULT_URL = "http://127.0.0.1:8000"


def adapter_files_folder() -> Path:
    """The folder of the path-loadable reward files: the installed ``grape_rewards.adapters.files`` (an editable
    install maps it to the checkout's ``adapters/``), else the ``adapters/`` beside an uninstalled checkout."""
    from .checks import installed_spec

    spec = installed_spec("grape_rewards.adapters.files")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(__file__).resolve().parents[2] / "adapters"


def adapter_file(framework: str) -> Path:
    """The installed path-loadable reward file of ``framework`` (``openrlhf`` or ``verl``)."""
    if framework not in ADAPTER_FILES:
        raise ValueError(f"no reward file for {framework!r}; known: {', '.join(ADAPTER_FILES)}")
    return adapter_files_folder() / ADAPTER_FILES[framework]


def flags_text(framework: str, url: str = DEFAULT_URL) -> str:
    """How to point ``framework`` at the reward service at ``url`` (and at the in-process alternative)."""
    base = url.rstrip("/")
    if base.endswith("/get_reward"):
        base = base[: -len("/get_reward")]
    if framework == "openrlhf":
        return "\n".join([
            "# OpenRLHF 0.11.2, HTTP mode (the reward service's /get_reward; comma-separate several services):",
            f"--reward.remote_url {base}/get_reward --data.input_key prompt --data.label_key label "
            "--data.apply_chat_template",
            "# VLM data (CIRR with reference images): add --data.image_key images --data.max_images_per_prompt 1",
            "# OpenRLHF's HTTP client sends no bearer token: a service on another host (which needs one) answers it"
            " 401.",
            "# There, start the service with --insecure (a trusted network only), or use the .py mode below, which"
            " sends GRAPE_TOKEN.",
            "# .py mode (the reward function in every vLLM engine; GRAPE_REWARD_URL or GRAPE_INDEX in their env):",
            f"--reward.remote_url {adapter_file('openrlhf')} --data.label_key label",
        ])
    if framework == "verl":
        return "\n".join([
            "# verl 0.9.1 (python -m verl.trainer.main_ppo ...):",
            f"reward.custom_reward_function.path={VERL_MODULE} reward.custom_reward_function.name=compute_score "
            f"+reward.custom_reward_function.reward_kwargs.url={base}",
            f"# or by file path: reward.custom_reward_function.path={adapter_file('verl')}",
        ])
    if framework == "trl":
        return "\n".join([
            "from grape_rewards.adapters.trl import make_reward_func",
            f"reward = make_reward_func(url={base!r})  # reads the 'grape_label' column",
            "trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=..., args=GRPOConfig(...))",
        ])
    raise ValueError(f"unknown framework {framework!r}; known: openrlhf, verl, trl")


def cmd_path(args: argparse.Namespace) -> int:
    path = adapter_file(args.framework)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from this installation of grape-rewards")
    print(path)
    return 0


def cmd_flags(args: argparse.Namespace) -> int:
    print(flags_text(args.framework, args.url))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .checks import CheckError, check_openrlhf, check_verl

    rest = list(args.args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    try:
        if args.framework == "openrlhf":
            parsed, problems = check_openrlhf(rest)
            summary = (f"OpenRLHF accepts the command line: estimator {parsed.algo.advantage.estimator}, "
                       f"{parsed.rollout.n_samples_per_prompt} samples per prompt, reward {parsed.reward.remote_url}, "
                       f"label key {parsed.data.label_key!r}, image key {parsed.data.image_key!r} "
                       f"(max {parsed.data.max_images_per_prompt} per prompt)")
        else:
            cfg, problems = check_verl(rest)
            rf = cfg.reward.custom_reward_function
            summary = (f"verl composes and validates the config: adv_estimator {cfg.algorithm.adv_estimator}, "
                       f"rollout.n {cfg.actor_rollout_ref.rollout.n}, reward {rf.path}::{rf.name} "
                       f"kwargs {dict(rf.get('reward_kwargs') or {})}")
    except CheckError as exc:
        print(f"grape-rewards adapters check {args.framework}: FAILED: {exc}", file=sys.stderr)
        return 1
    print(summary)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"grape-rewards adapters check {args.framework}: FAILED ({len(problems)} problem(s))", file=sys.stderr)
        return 1
    print(f"grape-rewards adapters check {args.framework}: OK")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``adapters`` sub-command to the ``grape-rewards`` parser."""
    p = sub.add_parser("adapters", help="point OpenRLHF, verl or TRL at the reward; check a launch without GPUs",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    asub = p.add_subparsers(dest="adapters_command", required=True, title="commands", metavar="COMMAND")

    a = asub.add_parser("path", help="print the installed reward file of a framework (its file mode)",
                        description="Print the path of the reward file that OpenRLHF (--reward.remote_url FILE) or "
                                    "verl (reward.custom_reward_function.path=FILE) loads.")
    a.add_argument("framework", choices=sorted(ADAPTER_FILES), help="openrlhf or verl")
    a.set_defaults(func=cmd_path)

    a = asub.add_parser("flags", help="print how to point a framework at the reward service",
                        description="Print the flags (OpenRLHF), the config overrides (verl) or the code (TRL) that "
                                    "point the framework at the reward service, ready to paste.")
    a.add_argument("framework", choices=["openrlhf", "trl", "verl"], help="openrlhf, trl or verl")
    a.add_argument("--url", default=DEFAULT_URL, help=f"the reward service's base URL (default {DEFAULT_URL})")
    a.set_defaults(func=cmd_flags)

    a = asub.add_parser("check", help="check a launch command with the installed framework's own parser (no GPU)",
                        usage="grape-rewards adapters check {openrlhf,verl} -- ARGS...",
                        description="Check a launch with the installed framework's own code, without GPUs: OpenRLHF's "
                                    "train_ppo_ray argument parser, or verl's Hydra config and reward loader; then "
                                    "list what would make a GRAPE run wrong (no label key, a URL without /get_reward, "
                                    "an estimator that is not GRPO...). Everything after -- is the framework's "
                                    "command line: train_ppo_ray flags (openrlhf) or Hydra overrides (verl).")
    a.add_argument("framework", choices=["openrlhf", "verl"], help="openrlhf or verl")
    a.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                   help="-- then the framework's flags (openrlhf) or overrides (verl)")
    a.set_defaults(func=cmd_check)

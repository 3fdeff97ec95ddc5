"""Check a training launch against the installed framework, without GPUs (the examples' ``--check`` mode).

- OpenRLHF: :func:`parse_openrlhf_args` runs the installed ``openrlhf/cli/train_ppo_ray.py``'s own ``__main__``
  block (its argparse parser, ``hierarchize`` and every assert of the script) with the GPU-only imports stubbed
  and the final ``train(args)`` replaced, so unknown or removed flags fail exactly as they would at launch.
- verl: :func:`compose_verl_config` composes the installed ``verl/trainer/config/ppo_trainer.yaml`` with the
  overrides through Hydra's compose API and runs verl's ``validate_config``.

On top, :func:`check_openrlhf` and :func:`check_verl` list what would make a GRAPE run silently wrong (no label
key, a URL without ``/get_reward``, the legacy verl reward block that ``main_ppo`` ignores, ...).
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import os
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GRPO_ESTIMATORS_OPENRLHF = ("group_norm", "dr_grpo")
"""OpenRLHF estimators of the GRPO family (group-normalised advantages)."""


class CheckError(RuntimeError):
    """The framework itself rejected the launch (unknown flag, failed assert, bad config); the message says why."""


def installed_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """The import spec of module ``name``, or None when it, or a package above it, is not installed.

    ``importlib.util.find_spec`` imports the parents of a dotted name and raises when one of them is missing.

    >>> installed_spec("no_such_package.cli") is None
    True
    """
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None


# -- OpenRLHF ------------------------------------------------------------------------------------------------
FRAMEWORK_PINS = {"openrlhf": "openrlhf==0.11.2", "verl": "verl==0.9.1"}
"""The framework releases the checks (and the adapters) are built against."""


def install_command(framework: str) -> str:
    """How to install ``framework`` and what its check imports, for a user of ``pip install grape-rewards``.

    >>> install_command("verl").split(" (")[0]
    "pip install 'grape-rewards[verl]' && pip install --no-deps verl==0.9.1"
    """
    return (f"pip install 'grape-rewards[{framework}]' && pip install --no-deps {FRAMEWORK_PINS[framework]} "
            "(--no-deps: its own requirements are the GPU training stack, which the check does not need)")


_OPENRLHF_STUBS: dict[str, dict[str, Any]] = {
    "openrlhf.trainer.ray": {"create_vllm_engines": None},
    "openrlhf.trainer.ray.launcher": {"RayActorGroup": None, "ReferenceModelActor": None, "RewardModelActor": None},
    "openrlhf.trainer.ray.ppo_actor": {"PolicyModelActor": None},
    "openrlhf.trainer.ray.ppo_critic": {"CriticModelActor": None},
}


def parse_openrlhf_args(argv: Sequence[str]) -> Any:
    """The hierarchized args exactly as ``python -m openrlhf.cli.train_ppo_ray ARGV`` builds and validates them.

    Raises :class:`CheckError` with argparse's message (unknown flags, bad values) or the script's failed assert.
    """
    spec = installed_spec("openrlhf.cli.train_ppo_ray")
    if spec is None or spec.origin is None:
        raise CheckError(f"OpenRLHF is not installed: {install_command('openrlhf')}")
    path = spec.origin
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    main_if = tree.body[-1]
    if not (isinstance(main_if, ast.If) and "__main__" in ast.unparse(main_if.test)
            and ast.unparse(main_if.body[-1]) == "train(args)"):
        raise CheckError(f"{path} does not end with the `if __name__ == '__main__': ... train(args)` block this "
                         "check expects (an OpenRLHF version other than 0.11.x?)")
    main_if.body[-1] = ast.parse("_CAPTURED.append(args)").body[0]
    captured: list[Any] = []
    saved_modules = {name: sys.modules.get(name) for name in _OPENRLHF_STUBS}
    saved_argv = sys.argv
    try:
        for name, attrs in _OPENRLHF_STUBS.items():
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
        sys.argv = ["train_ppo_ray.py", *argv]
        namespace = {"__name__": "__main__", "__file__": path, "_CAPTURED": captured}
        try:
            exec(compile(tree, path, "exec"), namespace)
        except ImportError as exc:
            raise CheckError(missing_for_check("openrlhf", exc.name, str(exc))) from None
        except SystemExit as exc:
            if exc.code in (0, None):
                raise
            raise CheckError(f"OpenRLHF's argument parser rejected the command line (exit {exc.code}; its message "
                             "is printed above)") from None
        except AssertionError as exc:
            raise CheckError(f"train_ppo_ray.py rejected the arguments: {exc}") from None
    finally:
        sys.argv = saved_argv
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return captured[0]


def check_openrlhf(argv: Sequence[str]) -> tuple[Any, list[str]]:
    """Parse ``argv`` with OpenRLHF's own code, then list what would make a GRAPE run wrong.

    Returns ``(args, problems)``; raises :class:`CheckError` when OpenRLHF itself rejects the command line.
    """
    args = parse_openrlhf_args(argv)
    problems: list[str] = []
    urls = args.reward.remote_url or []
    if not urls:
        problems.append("--reward.remote_url is not set: no reward (give http://HOST:PORT/get_reward or the path "
                        "printed by `grape-rewards adapters path openrlhf`)")
    elif urls[0].endswith(".py"):
        if not Path(urls[0]).is_file():
            problems.append(f"--reward.remote_url {urls[0]}: no such file")
    else:
        for url in urls:
            if not url.rstrip("/").endswith("/get_reward"):
                problems.append(f"--reward.remote_url {url}: OpenRLHF posts to the URL as given; end it with "
                                "/get_reward")
    if not args.data.label_key:
        problems.append("--data.label_key is not set: every label would be '' (prepared data: --data.label_key "
                        "label)")
    if args.algo.advantage.estimator not in GRPO_ESTIMATORS_OPENRLHF:
        problems.append(f"--algo.advantage.estimator is {args.algo.advantage.estimator!r}, not GRPO's group_norm")
    return args, problems


# -- verl ------------------------------------------------------------------------------------------------------
def verl_config_dir() -> str:
    """The installed verl's Hydra config folder (``verl/trainer/config``)."""
    spec = installed_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise CheckError(f"verl is not installed: {install_command('verl')}")
    return os.path.join(next(iter(spec.submodule_search_locations)), "trainer", "config")


CHECK_PACKAGES: dict[str, dict[str, str]] = {
    "openrlhf": {"ray": "ray", "pylatexenc": "pylatexenc"},
    "verl": {"datasets": "datasets", "hydra": "hydra-core", "omegaconf": "omegaconf", "ray": "ray",
             "tensordict": "tensordict", "codetiming": "codetiming", "accelerate": "accelerate"},
}
"""What each check imports besides the framework (installed with --no-deps) and this package's own requirements, by
module: the pip package of each. The extra named after the framework (``grape-rewards[verl]``) holds them all."""


def missing_for_check(framework: str, module: str | None, error: str = "") -> str:
    """The error for a module the check of ``framework`` cannot import: what is missing and the pip command that
    adds it (``error``, the ImportError's text, stands in when the module's name is unknown).

    >>> missing_for_check("verl", "datasets").split(": ")[-1]
    "pip install 'grape-rewards[verl]' (or pip install datasets)"
    >>> missing_for_check("openrlhf", "ray.util").split(": ")[-1]
    "pip install 'grape-rewards[openrlhf]' (or pip install ray)"
    """
    label = {"openrlhf": "an OpenRLHF command line", "verl": "a verl config"}[framework]
    root = (module or "").split(".")[0]
    if not root:
        return f"checking {label} failed on an import ({error}): pip install 'grape-rewards[{framework}]'"
    package = CHECK_PACKAGES[framework].get(root, root)
    why = " (verl's trainer imports it)" if (framework, root) == ("verl", "datasets") else ""
    return (f"checking {label} needs {root!r}{why}, which is not installed: pip install 'grape-rewards[{framework}]' "
            f"(or pip install {package})")


def compose_verl_config(overrides: Sequence[str]) -> Any:
    """``ppo_trainer`` composed with ``overrides`` (what ``python -m verl.trainer.main_ppo OVERRIDES`` builds),
    checked by verl's ``validate_config``; :class:`CheckError` with Hydra's or verl's message otherwise."""
    config_dir = verl_config_dir()
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException
        from verl.trainer.ppo.utils import need_critic, need_reference_policy
        from verl.utils.config import validate_config
    except ImportError as exc:
        raise CheckError(missing_for_check("verl", exc.name, str(exc))) from None

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            cfg = compose(config_name="ppo_trainer", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise CheckError(f"verl's Hydra config rejected the overrides: {exc}") from None
    try:
        with warnings.catch_warnings():  # expected for GRPO; not worth a warning in a check
            warnings.filterwarnings("ignore", message="Disabled critic")
            validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    except (AssertionError, ValueError, TypeError, KeyError, OmegaConfBaseException, HydraException) as exc:
        raise CheckError(f"verl's validate_config rejected the config: {type(exc).__name__}: {exc}") from None
    return cfg


def check_verl(overrides: Sequence[str], environ: dict[str, str] | None = None) -> tuple[Any, list[str]]:
    """Compose and validate verl's config, load the reward function through verl's own loader, and list what would
    make a GRAPE run wrong. Returns ``(cfg, problems)``; raises :class:`CheckError` when verl rejects the config."""
    environ = dict(os.environ) if environ is None else environ
    cfg = compose_verl_config(overrides)
    problems: list[str] = []
    legacy = cfg.get("custom_reward_function") or {}
    if legacy.get("path"):
        problems.append("custom_reward_function.path (top level) is ignored by verl.trainer.main_ppo: use "
                        "reward.custom_reward_function.path")
    reward_fn = cfg.reward.custom_reward_function
    if not reward_fn.path:
        problems.append("reward.custom_reward_function.path is not set (use pkg://grape_rewards.adapters.verl)")
    else:
        from verl.trainer.ppo.reward import get_custom_reward_fn

        try:
            fn = get_custom_reward_fn(cfg)
        except Exception as exc:
            problems.append(f"verl could not load {reward_fn.path}::{reward_fn.name}: {type(exc).__name__}: {exc}")
        else:
            if fn is None:
                problems.append(f"verl loaded nothing from {reward_fn.path}")
    kwargs = dict(reward_fn.get("reward_kwargs") or {})
    has_backend = any(kwargs.get(k) for k in ("url", "index")) or any(
        environ.get(v) for v in ("GRAPE_REWARD_URL", "GRAPE_INDEX"))
    if "grape_rewards" in str(reward_fn.path or "") and not has_backend:
        problems.append("no reward backend: add +reward.custom_reward_function.reward_kwargs.url=http://HOST:PORT "
                        "(or set GRAPE_REWARD_URL in the workers' environment)")
    if cfg.algorithm.adv_estimator != "grpo":
        problems.append(f"algorithm.adv_estimator is {cfg.algorithm.adv_estimator!r}, not grpo")
    if int(cfg.actor_rollout_ref.rollout.n) < 2:
        problems.append("actor_rollout_ref.rollout.n must be > 1 for GRPO (group-normalised advantages)")
    return cfg, problems

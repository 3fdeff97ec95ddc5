"""The path-loadable reward files: the one copy, installed with the package as ``grape_rewards.adapters.files``.

``openrlhf/reward_func.py`` (OpenRLHF ``--reward.remote_url <file>``) and ``verl/reward_fn.py`` (verl
``reward.custom_reward_function.path=<file>``). ``pyproject.toml`` maps this folder into the wheel, so the source tree
and an installation hold the same files; ``grape-rewards adapters path openrlhf|verl`` prints the installed path.
Each file only re-exports the function from :mod:`grape_rewards.adapters`.
"""

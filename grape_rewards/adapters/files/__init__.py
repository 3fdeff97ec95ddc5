"""Path-loadable reward files, installed with the package so a framework can be pointed at them.

``openrlhf_reward_func.py`` (OpenRLHF ``--reward.remote_url <file>``) and ``verl_reward_fn.py`` (verl
``reward.custom_reward_function.path=<file>``) are byte-identical copies of ``adapters/openrlhf/reward_func.py``
and ``adapters/verl/reward_fn.py`` in the source tree. ``grape-rewards adapters path openrlhf|verl`` prints
their installed paths. Each only re-exports the function from :mod:`grape_rewards.adapters`.
"""

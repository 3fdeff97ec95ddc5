"""grape-rewards reward for OpenRLHF's ``.py`` mode: pass this file's path as ``--reward.remote_url``.

    --reward.remote_url "$(grape-rewards adapters path openrlhf)"

OpenRLHF loads this file by path in every vLLM engine and calls ``reward_func(queries, prompts, labels)`` on
worker threads. Settings come from the engines' environment: ``GRAPE_REWARD_URL=http://HOST:PORT`` (the reward
service; recommended) or ``GRAPE_INDEX=DIR`` (score in-process). See ``grape_rewards.adapters.openrlhf``.
This file is installed with the package as ``grape_rewards/adapters/files/openrlhf/reward_func.py``.
"""

from grape_rewards.adapters.openrlhf import reward_func

__all__ = ["reward_func"]

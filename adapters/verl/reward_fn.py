"""grape-rewards reward for verl, loadable by file path (``pkg://grape_rewards.adapters.verl`` is the same).

    reward.custom_reward_function.path="$(grape-rewards adapters path verl)"
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.url=http://HOST:PORT

verl calls ``async compute_score(data_source, solution_str, ground_truth, extra_info, **reward_kwargs)`` once per
sample. See ``grape_rewards.adapters.verl``.
This file is installed with the package as ``grape_rewards/adapters/files/verl/reward_fn.py``.
"""

from grape_rewards.adapters.verl import compute_score

__all__ = ["compute_score"]

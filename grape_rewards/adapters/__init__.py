"""Thin glue between the reward and the RL frameworks: OpenRLHF, verl and TRL.

Each adapter talks to the reward service (``grape-rewards serve``, the documented default) or, when no
service URL is configured, scores in-process from an index (loaded lazily, once per process).

- :mod:`grape_rewards.adapters.openrlhf`: ``reward_func(queries, prompts, labels)`` for OpenRLHF's ``.py``
  reward mode (``--reward.remote_url /path/reward_func.py``; ``grape-rewards adapters path openrlhf`` prints
  the installed file). The HTTP mode needs no adapter: ``--reward.remote_url http://host:8000/get_reward``.
- :mod:`grape_rewards.adapters.verl`: ``async compute_score(data_source, solution_str, ground_truth, ...)``,
  for ``reward.custom_reward_function.path=pkg://grape_rewards.adapters.verl``.
- :mod:`grape_rewards.adapters.trl`: ``make_reward_func(...)`` / ``make_async_reward_func(...)`` for
  ``GRPOTrainer(reward_funcs=[...])``.

Settings come from keyword arguments (verl's ``reward_kwargs``, the TRL factory's arguments) or the
environment: ``GRAPE_REWARD_URL`` (service URL(s), comma-separated), ``GRAPE_TOKEN``, ``GRAPE_REWARD_TIMEOUT``,
``GRAPE_REWARD_RETRIES``; in-process: ``GRAPE_INDEX``, ``GRAPE_RETRIEVER``, ``GRAPE_REWARD_CONFIG``,
``GRAPE_DEVICE``.

Importing this package (and :mod:`grape_rewards.adapters.verl`) imports only the standard library: verl
imports the plugin in every reward worker.
"""

from __future__ import annotations

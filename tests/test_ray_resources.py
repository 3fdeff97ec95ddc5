"""``serve --ray`` checks the cluster's CPUs and GPUs before placing any actor (issue #14).

The check itself is pure Python (no Ray needed); the last test drives the command line on a local Ray of 2 CPUs,
where ``--shards 3`` with the default reservations used to wait out the 120 s shard timeout.
"""

from __future__ import annotations

import argparse
import re
import signal
import time
from pathlib import Path

import pytest

from grape_rewards.distributed.ray_resources import (
    Reservation,
    ResourceShortage,
    check_fits,
    serve_reservations,
)
from grape_rewards.distributed.ray_serve import add_ray_arguments

TWO_CPUS = {"CPU": 2.0, "memory": 4e9, "object_store_memory": 1e9, "node:127.0.0.1": 1.0}
ISSUE_14 = (
    "the Ray cluster cannot hold this service: 3 shard actors × 1 CPU + 1 replica × 1 CPU = 4 CPUs, the cluster has "
    "2 CPUs; lower --cpus-per-shard or --cpus-per-replica (fractions allowed, e.g. --cpus-per-shard 0.5 "
    "--cpus-per-replica 0.5 reserve 2 CPUs), or lower the number of shards (grape-rewards index shard --num-shards "
    "N, then --shards N)")


def shortage(reservations: list[Reservation], available: dict[str, float],
             total: dict[str, float] | None = None) -> str:
    with pytest.raises(ResourceShortage) as info:
        check_fits(reservations, available, total)
    assert isinstance(info.value, ValueError)  # what the CLI prints as a one-line error
    return str(info.value)


def test_three_shards_and_a_replica_on_two_cpus_say_what_and_which_flags() -> None:
    message = shortage(serve_reservations(1, 1.0, 0.0, num_shards=3, cpus_per_shard=1.0), TWO_CPUS)
    assert message == ISSUE_14
    assert "\n" not in message


def test_fractions_that_add_up_to_the_cluster_fit() -> None:
    check_fits(serve_reservations(2, 0.5, 0.0, num_shards=2, cpus_per_shard=0.5), TWO_CPUS)  # exactly 2
    check_fits(serve_reservations(1, 0.5, 0.0, num_shards=3, cpus_per_shard=0.5), TWO_CPUS)  # the suggestion
    check_fits(serve_reservations(3, 0.1, 0.0), {"CPU": 0.3})  # 3 x 0.1 is 0.30000000000000004 in floats
    check_fits(serve_reservations(4, 0.0, 0.0, num_shards=8, cpus_per_shard=0.0), {})  # reserves nothing
    message = shortage(serve_reservations(3, 0.25, 0.0, num_shards=2, cpus_per_shard=0.5), {"CPU": 1.5})
    assert "2 shard actors × 0.5 CPU + 3 replicas × 0.25 CPU = 1.75 CPUs, the cluster has 1.5 CPUs" in message
    assert "or lower --replicas or the number of shards" in message


def test_gpus_on_a_cluster_without_gpus() -> None:
    message = shortage(serve_reservations(2, 0.5, 1.0), TWO_CPUS)
    assert message == ("the Ray cluster cannot hold this service: 2 replicas × 1 GPU = 2 GPUs, the cluster has 0 GPUs; "
                       "lower --gpus-per-replica (fractions allowed; 0 runs on the CPU), or lower --replicas")
    assert "CPU" not in message.split(";")[0]  # the CPUs fit: only the GPUs are reported


def test_gpus_and_cpus_short_are_both_reported_without_a_gpu_split_that_cannot_pack() -> None:
    message = shortage(serve_reservations(2, 1.0, 1.0, num_shards=4, cpus_per_shard=1.0, gpus_per_shard=1.0),
                       {"CPU": 4.0, "GPU": 4.0})
    cpus, gpus = message.split("; and ")
    assert "4 shard actors × 1 CPU + 2 replicas × 1 CPU = 6 CPUs, the cluster has 4 CPUs" in cpus
    assert "4 shard actors × 1 GPU + 2 replicas × 1 GPU = 6 GPUs, the cluster has 4 GPUs" in gpus
    assert "lower --gpus-per-shard or --gpus-per-replica (fractions allowed; 0 runs on the CPU)" in gpus
    assert "e.g." not in gpus  # 0.66 of a GPU each would add up, yet not pack onto 4 GPUs


def test_a_joined_cluster_counts_only_its_free_resources() -> None:
    message = shortage(serve_reservations(2, 1.0, 0.0), {"CPU": 1.0}, total={"CPU": 8.0})
    assert "= 2 CPUs, the cluster has 1 CPU free (of 8 CPUs: other actors or tasks hold the rest)" in message
    check_fits(serve_reservations(2, 1.0, 0.0), {"CPU": 8.0}, total={"CPU": 8.0})


@pytest.mark.parametrize("flag, kwargs", [("--cpus-per-replica", {"cpus_per_replica": -1.0}),
                                          ("--gpus-per-shard", {"gpus_per_shard": float("nan")})])
def test_a_negative_or_nan_reservation_is_refused(flag: str, kwargs: dict[str, float]) -> None:
    args = {"replicas": 1, "cpus_per_replica": 1.0, "gpus_per_replica": 0.0, "num_shards": 2, **kwargs}
    with pytest.raises(ValueError, match=f"^{flag} must be a number >= 0"):
        serve_reservations(**args)


def test_every_flag_a_message_names_is_a_serve_flag() -> None:
    parser = argparse.ArgumentParser()
    add_ray_arguments(parser)
    options = set(parser._option_string_actions)
    messages = [ISSUE_14, shortage(serve_reservations(2, 1.0, 1.0, num_shards=2, gpus_per_shard=1.0), {"CPU": 1.0})]
    named = {flag for m in messages for flag in re.findall(r"--[a-z-]+", m)}
    assert named - {"--num-shards"} <= options, named - options  # --num-shards is index shard's
    assert {"--cpus-per-shard", "--cpus-per-replica", "--gpus-per-shard", "--gpus-per-replica", "--replicas",
            "--shards"} <= named
    assert parser.parse_args([]).check_resources and not parser.parse_args(["--no-resource-check"]).check_resources


def test_docs_show_the_message_and_every_ray_flag() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert f"grape-rewards serve: error: {ISSUE_14}\n" in docs
    parser = argparse.ArgumentParser()
    add_ray_arguments(parser)
    flags = {f for f in parser._option_string_actions if f.startswith("--") and f != "--help"}
    assert not {f for f in flags if f"`{f}" not in docs}, "document every Ray flag in docs/scaling.md's table"


# -- the real path: a local Ray of 2 CPUs ------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_serve_ray_three_shards_on_two_cpus_fails_at_once(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    from test_sharding import write_random_index

    from grape_rewards.cli import main
    from grape_rewards.distributed import shard_index
    from grape_rewards.server.testing import free_port

    shards = tmp_path / "shards"
    shard_index(write_random_index(tmp_path / "index", 30), shards, 3)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="grape_rewards_tests")
    try:
        started = time.monotonic()
        code = main(["serve", "--ray", "--index", str(shards), "--shards", "3", "--device", "cpu",
                     "--port", str(free_port()), "--log-level", "warning"])
        elapsed = time.monotonic() - started
        assert ray.util.list_named_actors(all_namespaces=True) == []  # nothing was placed
    finally:
        for sig, handler in handlers.items():  # serve_with_ray's own, installed for a blocking serve
            signal.signal(sig, handler)
        ray.shutdown()
    err = capsys.readouterr().err
    print(f"refused in {elapsed:.2f} s: {err.strip()}")
    assert code == 2
    assert f"grape-rewards serve: error: {ISSUE_14}\n" in err
    assert elapsed < 20  # at once, not after the 120 s shard timeout

"""The ensemble reward: several frozen retrievers over the same corpus ids, one index each.

Its rank part equals the mean / min of the single-retriever scorers' rank parts on the same items, exactly, and
every sample carries each retriever's rank; serve, score and the in-process adapters accept several indexes.
Pairs: two different random-init retrievers (a tiny BERT's saved weights and another draw of them), and MiniLM
with the tiny BERT (no second real text retriever can be downloaded here).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from grape_rewards.cli import main as cli_main
from grape_rewards.corpus import CorpusIndex, CorpusIndexError, build_index, read_source
from grape_rewards.demo import data_path
from grape_rewards.ensemble import EnsembleScorer, retriever_keys, scorer_from_indexes
from grape_rewards.retrievers import Retriever, create_retriever
from grape_rewards.rewards import RewardConfig
from grape_rewards.scorer import RewardItem, RewardScorer
from grape_rewards.server import ServeConfig, create_app
from grape_rewards.server.app import load_scorer
from grape_rewards.server.testing import ServerThread

CAPTIONS = [json.loads(line) for line in data_path("captions.jsonl").read_text().splitlines()]


def build(retriever: Retriever, folder: Path, rows: list[dict] | None = None) -> Path:
    source = folder.with_suffix(".jsonl")
    source.write_text("".join(json.dumps(r) + "\n" for r in rows or CAPTIONS), encoding="utf-8")
    build_index(read_source(source), retriever, folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def retrievers(minilm: Retriever, text_encoder_dir: Path) -> dict[str, Retriever]:
    """MiniLM, a tiny BERT's saved random weights, and the same architecture freshly drawn (``random:``)."""
    return {"minilm": minilm, "tiny_bert": create_retriever(f"text:{text_encoder_dir}", device="cpu"),
            "tiny_random": create_retriever(f"random:text:{text_encoder_dir}", device="cpu")}


@pytest.fixture(scope="module")
def indexes(retrievers: dict[str, Retriever], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ensemble")
    return {name: build(r, root / name) for name, r in retrievers.items()}


def items() -> list[RewardItem]:
    queries = [json.loads(line) for line in data_path("queries.jsonl").read_text().splitlines()]
    out = [RewardItem(rewrite=c, target_ids=q["target_ids"], original_query=q["query"])
           for q in queries for c in q["candidates"]]
    out += [RewardItem(rewrite=row["text"].lower(), target_ids=[row["id"]], original_query=row["text"])
            for row in CAPTIONS[:20]]
    out.append(RewardItem(completion="<answer></answer>", target_ids=["cap001"], original_query="a dog"))
    return out


@pytest.mark.parametrize(("pair", "rule", "relative"), [
    (("tiny_bert", "tiny_random"), "mean", False), (("tiny_bert", "tiny_random"), "min", True),
    (("minilm", "tiny_bert"), "mean", True), (("minilm", "tiny_bert"), "min", False)])
def test_rank_part_is_the_mean_or_min_of_the_single_scorers(retrievers: dict[str, Retriever],
                                                            indexes: dict[str, Path], pair: tuple[str, str],
                                                            rule: str, relative: bool) -> None:
    config = RewardConfig(ensemble=rule, relative=relative)
    singles = [RewardScorer(retrievers[n], CorpusIndex.load(indexes[n]), config) for n in pair]
    ensemble = EnsembleScorer([retrievers[n] for n in pair], [CorpusIndex.load(indexes[n]) for n in pair], config)
    batch = items()
    expected = [s.score(batch) for s in singles]
    got = ensemble.score(batch)
    assert tuple(got[0]) == ensemble.keys and set(retriever_keys(2)) <= set(ensemble.keys)
    differ = 0
    for i, sample in enumerate(got):
        parts = [e[i]["part_rank"] for e in expected]
        combined = math.fsum(parts) / 2 if rule == "mean" else min(parts)
        assert sample["part_rank"] == combined  # exactly
        assert sample["reward"] == (combined if batch[i].rewrite else -1.0)  # default weights: the rank part
        for j, e in enumerate(expected):
            assert sample[f"retriever_{j}_rank"] == e[i]["rank"] and sample[f"retriever_{j}_part_rank"] == parts[j]
        assert {k: sample[k] for k in ("rank", "target_sim", "margin", "num_tokens")} == \
            {k: expected[0][i][k] for k in ("rank", "target_sim", "margin", "num_tokens")}
        differ += parts[0] != parts[1]
    assert differ >= 4  # two different retrievers (a caption itself ranks first under both): not one in disguise


def test_ensemble_needs_the_same_ids(retrievers: dict[str, Retriever], indexes: dict[str, Path],
                                     tmp_path: Path) -> None:
    fewer = build(retrievers["tiny_random"], tmp_path / "fewer", CAPTIONS[:-1])
    with pytest.raises(CorpusIndexError, match=f"index {fewer} does not hold the same ids as "
                                               f"{indexes['tiny_bert']}: '{CAPTIONS[-1]['id']}' is in "
                                               f"{indexes['tiny_bert']} only \\(1 ids missing, 0 extra\\)"):
        EnsembleScorer([retrievers["tiny_bert"], retrievers["tiny_random"]],
                       [CorpusIndex.load(indexes["tiny_bert"]), CorpusIndex.load(fewer)])
    with pytest.raises(CorpusIndexError, match=f"'{CAPTIONS[-1]['id']}' is in {indexes['tiny_random']} only"):
        EnsembleScorer([retrievers["tiny_random"], retrievers["tiny_bert"]],  # the first one lacks it
                       [CorpusIndex.load(fewer), CorpusIndex.load(indexes["tiny_random"])])
    with pytest.raises(ValueError, match="two or more retrievers"):
        EnsembleScorer([retrievers["tiny_bert"]], [CorpusIndex.load(indexes["tiny_bert"])])


def test_serve_score_and_adapters_accept_several_indexes(indexes: dict[str, Path], tmp_path: Path) -> None:
    paths = [str(indexes["tiny_bert"]), str(indexes["tiny_random"])]
    (tmp_path / "reward.yaml").write_text("ensemble: min\n", encoding="utf-8")
    config = ServeConfig(index=",".join(paths), device="cpu", reward_config=str(tmp_path / "reward.yaml"))
    assert config.index == paths and ServeConfig(index=[paths[0]]).index == paths[0]
    scorer = load_scorer(config)
    assert isinstance(scorer, EnsembleScorer) and scorer.config.ensemble == "min"
    label = json.dumps({"target_ids": ["cap000"]})
    with ServerThread(create_app(scorer, config)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        info = http.get("/info").json()["ensemble"]
        assert info["rule"] == "min" and [m["index"] for m in info["members"]] == paths
        logs = http.post("/get_reward", json={"query": ["a dog catches a frisbee"], "labels": [label]}).json()
        ranks = [logs["extra_logs"][f"retriever_{j}_rank"][0] for j in range(2)]
        assert all(r >= 1 for r in ranks) and logs["extra_logs"]["rank"][0] == ranks[0]

    from grape_rewards.adapters.openrlhf import reward_lists

    local = reward_lists(["a dog catches a frisbee"], None, [label], index=",".join(paths), device="cpu",
                         reward_config=str(tmp_path / "reward.yaml"))
    assert local["extra_logs"]["retriever_1_rank"] == [ranks[1]] and local["rewards"] == logs["rewards"]

    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"rewrite": "a dog catches a frisbee", "target_ids": ["cap000"]}) + "\n")
    argv = ["score", "--index", paths[0], "--index", paths[1], "--ensemble", "min", "--input", str(rows),
            "--output", str(tmp_path / "out.jsonl"), "--quiet", "--device", "cpu"]
    assert cli_main(argv) == 0
    (out,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [out["retriever_0_rank"], out["retriever_1_rank"]] == ranks
    assert out["part_rank"] == min(out["retriever_0_part_rank"], out["retriever_1_part_rank"])
    assert cli_main([*argv[:5], "--retriever", "text:all-MiniLM-L6-v2", *argv[5:]]) == 2  # one retriever each


def test_a_retriever_beside_several_indexes_is_refused_once_before_loading(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One rule (ensemble.check_ensemble_request) for score, serve and the adapters: a ValueError, raised before any
    index or model is read (the folders here do not exist), which the CLI reports as a usage error."""
    missing = [str(tmp_path / "a"), str(tmp_path / "b")]
    for load in (lambda: scorer_from_indexes(missing, retriever="text:all-MiniLM-L6-v2"),
                 lambda: load_scorer(ServeConfig(index=",".join(missing), retriever="text:all-MiniLM-L6-v2"))):
        with pytest.raises(ValueError, match="each index's own retriever; drop --retriever"):
            load()
    with pytest.raises(ValueError, match="no index given"):
        scorer_from_indexes([])
    argv = ["serve", "--index", missing[0], "--index", missing[1], "--retriever", "text:all-MiniLM-L6-v2",
            "--port", "0"]
    capsys.readouterr()
    assert cli_main(argv) == 2
    assert "grape-rewards serve: error: retriever: an ensemble of indexes uses each index's own retriever" in \
        capsys.readouterr().err


INDEX_FORMS = [(["A"], ["A"]), (["A,B"], ["A", "B"]), (["A", "B"], ["A", "B"]), ([" A , B ", "C"], ["A", "B", "C"])]
"""``--index`` values (one per flag) and the folders they name: one syntax in every command (index_list)."""


def folders_named(command: str, values: list[str]) -> list[str]:
    """The index folders ``command`` resolves from ``values`` (flags for the CLI verbs, settings for the adapters)."""
    from grape_rewards.adapters import _common
    from grape_rewards.cli import build_parser
    from grape_rewards.server.cli import config_from_args

    flags = [arg for value in values for arg in ("--index", value)]
    parse = build_parser().parse_args
    if command == "serve":
        return config_from_args(parse(["serve", *flags])).index_paths
    if command == "score":
        return parse(["score", *flags, "--input", "in.jsonl", "--output", "out.jsonl"]).index
    if command == "eval":
        return parse(["eval", "--benchmark", "cirr", "--root", "data", "--out", "out", *flags]).index
    if command == "demo":
        return parse(["demo", *flags]).index
    setting = values[0] if len(values) == 1 else values  # the adapters' index setting: a string or a list
    return _common.index_paths(_common.resolve_settings({"index": setting}, environ={}).index)


@pytest.mark.parametrize("command", ["serve", "score", "eval", "demo", "adapters"])
@pytest.mark.parametrize(("values", "expected"), INDEX_FORMS)
def test_every_command_reads_index_folders_in_one_syntax(command: str, values: list[str], expected: list[str]) -> None:
    assert folders_named(command, values) == expected


@pytest.mark.parametrize("command", ["serve", "score", "eval", "demo", "adapters"])
def test_a_stray_comma_in_index_is_one_clear_error_in_every_command(command: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises((ValueError, SystemExit)) as raised:
        folders_named(command, ["A,"])
    message = str(raised.value) if isinstance(raised.value, ValueError) else capsys.readouterr().err
    assert "'A,': entry 2 of 2 is empty (a stray comma?)" in message, message


def test_score_serve_demo_and_adapters_run_on_comma_separated_indexes(indexes: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``--index A,B`` scores an ensemble in ``score`` as in ``serve``; the adapters take a list; the demo, which
    compares two rewards over one index, refuses two with one line."""
    from grape_rewards.adapters.openrlhf import reward_lists

    paths = [str(indexes["tiny_bert"]), str(indexes["tiny_random"])]
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"rewrite": "a dog catches a frisbee", "target_ids": ["cap000"]}) + "\n")
    assert cli_main(["score", "--index", ",".join(paths), "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                     "--quiet", "--device", "cpu"]) == 0
    (out,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    label = json.dumps({"target_ids": ["cap000"]})
    local = reward_lists(["a dog catches a frisbee"], None, [label], index=paths, device="cpu")
    assert local["extra_logs"]["retriever_1_rank"] == [out["retriever_1_rank"]]
    assert load_scorer(ServeConfig(index=[",".join(paths)], device="cpu")).describe()["members"][1]["index"] == paths[1]
    capsys.readouterr()
    assert cli_main(["demo", "--index", ",".join(paths), "--device", "cpu"]) == 2
    assert "--index: the demo uses one index, got 2" in capsys.readouterr().err

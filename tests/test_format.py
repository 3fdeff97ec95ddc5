"""Rewrite extraction from real chat-templated strings, and the composite reward."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grape_rewards.labels import LabelError, parse_label
from grape_rewards.rewards import (
    Extraction,
    RewardConfig,
    extract_rewrite,
    response_from_query,
    sample_keys,
    score_sample,
    strip_special_tokens,
)

QWEN_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "Rewrite for image search: 一只狗在草地上奔跑<|im_end|>\n<|im_start|>assistant\n")
QWEN_VL_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  "<|vision_start|><|image_pad|><|vision_end|>Describe the target image.<|im_end|>\n"
                  "<|im_start|>assistant\n")
LLAMA3_QUERY = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nRewrite: 狗<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n<answer>a dog</answer><|eot_id|>")


@pytest.mark.parametrize(
    ("completion", "text", "status"),
    [
        ("<answer>A dog running on grass.</answer><|im_end|>", "A dog running on grass.", "ok"),
        ("<think>The query is Chinese; translate.</think>\n<answer>a dog running on grass</answer><|im_end|>"
         "<|endoftext|>", "a dog running on grass", "ok"),
        ("<think>translate it</think>\nA dog running on grass.<|im_end|>", "A dog running on grass.", "ok"),
        ("A dog running on grass.<|im_end|>", "A dog running on grass.", "ok"),
        ("<answer>first</answer> then <answer>second</answer>", "second", "ok"),
        ("<think>I need to think about this for a very long time", "", "missing"),
        ("<answer>a dog running on", "", "missing"),
        ("<answer>   </answer><|im_end|>", "", "empty"),
        ("<|im_end|>", "", "empty"),
        ("", "", "empty"),
        ('<answer>"a quoted dog"</answer>', "a quoted dog", "ok"),
        ("<answer>" + "word " * 300 + "</answer>", ("word " * 300).strip(), "overlong"),
    ],
)
def test_extract_rewrite(completion, text, status):
    ex = extract_rewrite(completion)
    assert (ex.text, ex.status) == (text, status)


def test_required_tags_and_none():
    assert extract_rewrite("a dog", require_answer_tag=True).status == "missing"
    assert extract_rewrite(None).status == "missing"
    assert extract_rewrite("<final>x</final>", answer_tag="final").text == "x"


def test_response_from_openrlhf_query():
    response = "<think>ok</think><answer>a dog runs on grass</answer><|im_end|><|endoftext|>"
    assert response_from_query(QWEN_PROMPT + response, QWEN_PROMPT) == response
    # VLM: the image placeholder was expanded into many pad tokens, so the prompt is not a prefix.
    expanded = QWEN_VL_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * 64)
    assert response_from_query(expanded + response, QWEN_VL_PROMPT) == response
    assert extract_rewrite(response_from_query(LLAMA3_QUERY)).text == "a dog"
    assert response_from_query("plain text", None) == "plain text"


def test_strip_special_tokens():
    assert strip_special_tokens("<s>a cat</s><pad><pad>") == "a cat"
    assert strip_special_tokens("a cat<end_of_turn>") == "a cat"


def test_composite_keys_are_fixed_and_formula_holds():
    config = RewardConfig(shape="reciprocal", weights={"rank": 2.0, "similarity": 0.5, "format": 0.1})
    ok = score_sample(config, Extraction("x", "ok"), rank=4, n=10, target_sim=0.6, mean_sim=0.2,
                      best_nontarget_sim=0.7)
    assert ok["reward"] == pytest.approx(2.0 * 0.25 + 0.5 * 0.6 + 0.1)
    assert ok["margin"] == pytest.approx(-0.1)
    long = score_sample(config, Extraction("x", "overlong"), rank=4, n=10, target_sim=0.6, mean_sim=0.2,
                        best_nontarget_sim=0.7, truncated=True)
    assert long["reward"] == pytest.approx(ok["reward"] - 0.1 - config.format.overlong_penalty)
    bad = score_sample(config, Extraction("", "empty"), rank=10, n=10, target_sim=0.0, mean_sim=0.0,
                       best_nontarget_sim=0.0)
    assert bad["reward"] == config.format.invalid_reward
    assert tuple(ok) == tuple(long) == tuple(bad) == sample_keys(config)


def test_relative_mode():
    config = RewardConfig(shape="reciprocal", relative=True)
    out = score_sample(config, Extraction("x", "ok"), rank=1, n=10, target_sim=0.9, mean_sim=0.1,
                       best_nontarget_sim=0.5, original_rank=4)
    assert out["reward"] == pytest.approx(1.0 - 0.25)
    assert out["original_rank"] == 4.0
    with pytest.raises(ValueError, match="original query"):
        score_sample(config, Extraction("x", "ok"), rank=1, n=10, target_sim=0.9, mean_sim=0.1,
                     best_nontarget_sim=0.5)


def test_config_validation_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="unknown reward part"):
        RewardConfig(weights={"rnak": 1.0})
    with pytest.raises(ValueError):
        RewardConfig(shape="cubic")
    path = tmp_path / "reward.yaml"
    path.write_text("shape: recall@k\nk: 5\nformat:\n  require_answer_tag: true\n")
    config = RewardConfig.from_yaml(path)
    assert (config.shape, config.k, config.format.require_answer_tag) == ("recall@k", 5, True)
    path.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        RewardConfig.from_yaml(path)


def test_labels():
    label = parse_label('{"target_ids": ["a", 3], "reference_id": "r", "query_id": 7}')
    assert (label.target_ids, label.reference_id, label.query_id) == (["a", "3"], "r", "7")
    assert parse_label({"target_ids": "x"}).target_ids == ["x"]
    for bad, message in [("", "empty label"), ("{bad json", "not valid JSON"), ({"target_ids": []}, "target_ids"),
                         ({"reference_id": "r"}, "target_ids"), (3.5, "must be an object")]:
        with pytest.raises(LabelError, match=message):
            parse_label(bad)


_label_values = st.one_of(st.none(), st.text(max_size=5), st.integers(-3, 3), st.lists(st.one_of(st.text(max_size=4),
                                                                                                st.integers(0, 9)),
                                                                                       max_size=3))


@settings(max_examples=400, deadline=None)
@given(raw=st.dictionaries(st.sampled_from(["target_ids", "excluded_ids", "reference_id", "query_id",
                                            "original_query", "other"]), _label_values, max_size=6))
def test_parse_label_of_a_mapping_is_pydantics_validation(raw):
    """parse_label of a mapping gives what Label.model_validate gives, or refuses what it refuses (a LabelError)."""
    from pydantic import ValidationError

    from grape_rewards.labels import Label, LabelError, parse_label

    try:
        want = Label.model_validate(raw)
    except ValidationError:
        with pytest.raises(LabelError):
            parse_label(raw)
        return
    got = parse_label(raw)
    assert got.model_dump() == want.model_dump()
    assert type(got.target_ids) is list and type(got.excluded_ids) is list


def test_rewards_import_without_torch() -> None:
    """The reward maths is pure: importing it (and each of its modules) loads no torch, in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys, grape_rewards.rewards, grape_rewards.rewards.format, grape_rewards.rewards.composite; "
            "heavy = sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules); "
            "sys.exit(f'imported {heavy}' if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

"""`python -m rayrlhf.train_rm` end to end, as a user runs it: the embedded default and the real TL;DR data."""
import json
import subprocess
import sys

import pytest
import yaml
from transformers import AutoModelForSequenceClassification

from rayrlhf.data.sources import is_eval_prompt

from conftest import ROOT, child_env, data_file, shared_file

pytestmark = pytest.mark.slow


def train_rm(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rayrlhf.train_rm", *args], cwd=ROOT, env=child_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_eval(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["phase"] == "eval"], [r for r in records if r["phase"] == "train"]


def test_embedded_default_learns_and_writes_a_run_dir(tmp_path):
    run_dir = tmp_path / "tiny"
    result = train_rm("conf/rm_tiny.yaml", f"run_dir={run_dir}")
    evals, steps = final_eval(run_dir)
    before, after = evals
    assert len(steps) == after["steps"] == 80
    assert before["eval_accuracy"] < 0.6 < 0.7 < after["eval_accuracy"]  # learned from chance level
    assert after["reward_difference_variance"] > before["reward_difference_variance"]
    assert "held-out accuracy" in result.stdout
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["reward"]["method"] == "metarm"
    AutoModelForSequenceClassification.from_pretrained(run_dir / "reward_model")
    assert any((run_dir / "tensorboard").iterdir())


def test_tldr_comparisons_report_held_out_accuracy_on_a_post_split(tmp_path):
    comparisons = data_file("tldr", "comparisons_batch13.jsonl")
    data_file("tldr", "comparisons_cnndm0.jsonl")
    tokenizer = shared_file("tokenizers", "gpt2")
    run_dir = tmp_path / "tldr"
    result = train_rm(
        "conf/rm_tldr.yaml", f"run_dir={run_dir}", "reward_model.source=tiny", f"reward_model.tokenizer={tokenizer}",
        "data.max_prompt_tokens=48", "data.max_response_tokens=24", "reward.max_steps=6", "reward.alpha=1e-3",
    )
    evals, steps = final_eval(run_dir)
    post_ids = [json.loads(line)["info"]["id"] for line in comparisons.open()]
    held_out = sum(is_eval_prompt(post_id, 0.15, seed=0) for post_id in post_ids)
    assert evals[-1]["eval_pairs"] == held_out and evals[-1]["target_pairs"] == 437
    assert len(steps) == 6 and all(0 <= s["difference_loss"] <= 1 for s in steps)
    assert f"held-out accuracy: {evals[-1]['eval_accuracy']:.4f}" in result.stdout


def test_bilevel_meta_training_over_topic_domains_writes_a_reward_model(tmp_path):
    """reward.method bilevel on the synthetic task split into 4 topic domains, with the tiny random policy as the
    inner problem's reference: every step logs the outer loss before and after the policy's inner step, the
    RM's accuracy on the step's labelled pairs and the weights' norm, and the RM is saved."""
    run_dir = tmp_path / "bilevel"
    result = train_rm("conf/rm_tiny.yaml", f"run_dir={run_dir}", "reward.method=bilevel", "reward.bilevel.domain_by=topic",
                      "reward.samples_per_prompt=4", "reward.max_steps=12", "data.synthetic.relevance=any")
    evals, steps = final_eval(run_dir)
    assert len(steps) == evals[-1]["steps"] == 12
    for step in steps:
        assert step["outer_loss_before"] == pytest.approx(0.6931, abs=1e-4)  # the reference policy: margins 0
        assert 0 < step["outer_loss_after"] and step["weight_norm"] > 0 and 0 <= step["accuracy"] <= 1
    assert "bilevel domains: topics0" in result.stdout
    AutoModelForSequenceClassification.from_pretrained(run_dir / "reward_model")

"""`python -m rayrlhf.train_rm` end to end, as a user runs it: the embedded default and the real TL;DR data."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rayrlhf.data.sources import is_eval_prompt
from rayrlhf.training.distributed import free_port

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


def test_bilevel_meta_training_over_topic_domains_writes_a_reward_model_the_loop_meta_tests(tmp_path):
    """reward.method bilevel on the synthetic task split into 4 topic domains, with the tiny random policy as the
    inner problem's reference: every step logs the outer loss before and after the policy's inner step, the
    RM's accuracy on the step's labelled pairs and the weights' norm, and the RM is saved; the round loop then
    meta-tests it frozen."""
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

    # meta-test: the round loop on that reward model as saved, frozen (no training before or during the rounds)
    loop_dir = tmp_path / "meta_test"
    loop = subprocess.run([sys.executable, "-m", "rayrlhf.run", "conf/tiny.yaml", f"run_dir={loop_dir}", "rounds=2",
                           f"reward_model.source={run_dir / 'reward_model'}", "reward.method=vanilla",
                           "reward.initial_epochs=0", "reward.train_each_round=false", "rollout.engine=hf",
                           "ppo.steps_per_round=2", "sft.steps=4", "rollout.max_new_tokens=8", "data.synthetic.relevance=any"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert loop.returncode == 0, loop.stderr[-3000:]
    records = [json.loads(line) for line in (loop_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["phase"] == "start")
    rounds = [r for r in records if r["phase"] == "round"]
    assert start["initial_rm_steps"] == 0 and [r["rm_steps"] for r in rounds] == [0, 0]
    # the held-out loss of the loaded RM, unchanged by two rounds of PPO against it
    assert [r["eval_loss"] for r in rounds] == [start["initial_eval_loss"]] * 2


def test_bilevel_on_two_gloo_ranks_makes_the_one_rank_steps(tmp_path):
    """Each rank takes half of every step's support prompts and labelled pairs; the inner step's gradient and the
    outer gradient are reduced across ranks and each rank's share of the RM's sums is scaled for the engine's
    average, so 2 ranks write the reward model (and log the step metrics) of 1."""
    bilevel = ("conf/rm_tiny.yaml", "reward.method=bilevel", "reward.bilevel.domain_by=topic", "reward.samples_per_prompt=4",
               "reward.max_steps=4", "reward.alpha=1e-3", "data.synthetic.relevance=any", "reward.bilevel.inner_lr=0.5",
               "reward.bilevel.vanilla_weight=0.5", "reward.adam_eps=1e-3")  # no Adam step of ±alpha from a gradient of ~0
    one, two = tmp_path / "one", tmp_path / "two"
    train_rm(*bilevel, f"run_dir={one}")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "rayrlhf.train_rm", *bilevel, f"run_dir={two}", "resources.reward_learner_ranks=2"]
    result = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (one_evals, one_steps), (_, two_steps) = final_eval(one), final_eval(two)
    assert len(one_steps) == len(two_steps) == 4
    for name in ("outer_loss_after", "weight_norm", "weighted_reward", "loss", "accuracy"):
        assert [s[name] for s in two_steps] == pytest.approx([s[name] for s in one_steps], rel=1e-4, abs=1e-6), name
    assert abs(one_evals[-1]["eval_loss"] - one_evals[0]["eval_loss"]) > 1e-3  # the steps moved the RM
    one_weights, two_weights = (load_file(run / "reward_model" / "model.safetensors") for run in (one, two))
    assert one_weights.keys() == two_weights.keys()
    for name, value in one_weights.items():
        torch.testing.assert_close(two_weights[name], value, atol=2e-5, rtol=0)

"""The evaluation's pieces against hand computations: verdicts and their order symmetry, Self-BLEU, embedding
similarity, the KL estimate's log-probs, and held-out judging in the loop's form."""
import json
import math

import pytest
import torch

from rayrlhf.config import ModelSpec, RunConfig, SyntheticTask, load_config
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.evaluation.diversity import mean_pairwise_cosine, self_bleu
from rayrlhf.evaluation.held_out import HeldOutJudging
from rayrlhf.evaluation.judging import GoldJudge, RewardModelJudge, compare, verdicts, win_tie_lose
from rayrlhf.evaluation.policies import kl_estimate, sample, sequence_log_probs
from rayrlhf.models.build import build_causal_lm, build_reward_model, save_model

TASK = SyntheticPreferenceTask(SyntheticTask(max_response_words=3), 0)


def test_verdicts_and_rates_by_hand():
    first, second = torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.tensor([0.0, 2.05, 0.5, 4.0])
    assert verdicts(first, second, 0.1).tolist() == [1, 0, 0, -1]
    assert verdicts(first, second, 0.0).tolist() == [1, -1, 0, -1]
    rates = win_tie_lose(first, second, 0.1)
    assert (rates["win_rate"], rates["tie_rate"], rates["lose_rate"]) == (0.25, 0.5, 0.25)
    assert rates["judge_score"] == pytest.approx(1.625) and rates["judge_score_baseline"] == pytest.approx(1.6375)


def test_gold_judge_scores_by_the_task_and_swapping_sides_mirrors_the_verdicts():
    prompts = ["Q: t1 t2 t3 A:"] * 3
    first, second = ["t1 t2", "t1 t1 t1", "w1"], ["t1", "t2 w3", "w2"]
    # gold: t1 t2 -> 2; t1 t1 t1 -> 1 - 0.5*2 = 0; w1 -> 0; t1 -> 1; t2 w3 -> 1; w2 -> 0
    forward = compare(GoldJudge(TASK), prompts, first, second, 0.0)
    backward = compare(GoldJudge(TASK), prompts, second, first, 0.0)
    assert (forward["win_rate"], forward["tie_rate"], forward["lose_rate"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert (backward["win_rate"], backward["lose_rate"]) == (forward["lose_rate"], forward["win_rate"])


def test_a_reward_model_judge_is_order_symmetric(tmp_path):
    tokenizer = TASK.tokenizer()
    spec = ModelSpec(source="tiny")
    save_model(build_reward_model(spec, tokenizer, seed=3), tokenizer, tmp_path / "judge")
    judge = RewardModelJudge(str(tmp_path / "judge"), max_prompt_tokens=16, max_response_tokens=16)
    prompts = ["Q: t1 t2 t3 A:", "Q: t4 t5 t6 A:", "Q: t7 t8 t9 A:", "Q: t1 t5 t9 A:"]
    first, second = ["t1 t2", "w1 w2 w3", "t7", "t9 t9"], ["t3", "t4 t5", "w5 t8 t8", "w9"]
    forward, backward = compare(judge, prompts, first, second, 0.0), compare(judge, prompts, second, first, 0.0)
    assert forward["win_rate"] + forward["tie_rate"] + forward["lose_rate"] == pytest.approx(1.0)
    assert (backward["win_rate"], backward["tie_rate"], backward["lose_rate"]) == \
        (forward["lose_rate"], forward["tie_rate"], forward["win_rate"])
    # each response's score does not depend on what it is batched with
    alone = torch.cat([judge.score([p], [r]) for p, r in zip(prompts, first)])
    assert torch.allclose(judge.score(prompts, first), alone, atol=1e-5)


def test_self_bleu_by_hand():
    # "a b c" against "a b d": unigram precision 2/3, bigram 1/2, no brevity penalty -> sqrt(1/3); both ways alike
    assert self_bleu(["a b c", "a b d"], 2) == pytest.approx(math.sqrt(1 / 3), abs=1e-6)
    assert self_bleu(["t1 t2 t3 t4", "t1 t2 t3 t4", "t1 t2 t3 t4"], 4) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        self_bleu(["one"], 2)


def test_mean_pairwise_cosine_by_hand():
    # cos(e1, e2) = 0, cos(e1, e1+e2) = cos(e2, e1+e2) = 1/sqrt(2): mean over the 3 pairs
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert mean_pairwise_cosine(embeddings) == pytest.approx(2 / (3 * math.sqrt(2)))


def test_sampled_log_probs_equal_a_full_forward_so_kl_to_itself_is_zero():
    """The sampler's per-token log-probs (the decoder's, with a KV cache) against one forward pass over prompt and
    response (transformers, as PPO computes them): an independent path to the same numbers."""
    config = load_config("conf/tiny.yaml", ["rollout.max_new_tokens=6", "evaluation.samples_per_prompt=2"])
    tokenizer = TASK.tokenizer()
    model = build_causal_lm(config.policy, tokenizer, seed=1).eval()
    prompts = [prompt for _, prompt in TASK.prompts()[:5]]
    samples = sample(model, tokenizer, prompts, config, seed=11)
    assert len(samples.responses) == 10 and samples.prompts[:2] == [prompts[0]] * 2
    again = sequence_log_probs(model, samples, tokenizer.pad_token_id, batch_size=3)
    assert torch.allclose(samples.log_probs, again, atol=1e-4)
    assert kl_estimate(samples.log_probs, again) == pytest.approx(0.0, abs=1e-4)
    other = build_causal_lm(config.policy, tokenizer, seed=2).eval()
    assert kl_estimate(samples.log_probs, sequence_log_probs(other, samples, tokenizer.pad_token_id)) > 0.1


def test_held_out_judging_records_the_initial_responses_and_judges_against_them(tmp_path):
    prompts = ["Q: t1 t2 t3 A:", "Q: t4 t5 t6 A:"]
    answers = {0: ["t1", "w1", "t4 t5", "t4"], 1: ["t1 t2 t3", "w1 w2", "w4", "t4 t5 t6"]}
    calls = []

    def sampler(asked, n, seed):
        calls.append(seed)
        return answers[len(calls) - 1]

    judging = HeldOutJudging(GoldJudge(TASK), prompts, 2, 0.0, seed=5, run_dir=tmp_path)
    judging.record_initial(sampler)
    recorded = [json.loads(line) for line in (tmp_path / "evaluation" / "initial_held_out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in recorded] == [prompts[0]] * 2 + [prompts[1]] * 2
    judged = judging.judge_policy(sampler)
    # gold now 3, 0, 0, 3 against 1, 0, 2, 1: win, tie, lose, win
    assert (judged["win_rate"], judged["tie_rate"], judged["lose_rate"]) == (0.5, 0.25, 0.25)
    assert judged["judge_score"] == 1.5 and judged["judge_score_initial"] == 1.0
    assert calls == [5, 5]  # the same seed for the initial and every judged policy
    resumed = HeldOutJudging(GoldJudge(TASK), prompts, 2, 0.0, seed=5, run_dir=tmp_path)
    assert resumed.load_initial() and resumed.initial == answers[0]


def test_judge_settings_are_checked_before_anything_starts():
    from rayrlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="judge_model"):
        load_config("conf/tldr_cpu.yaml", ["evaluation.judge=reward_model"])
    with pytest.raises(ConfigError, match="synthetic task"):
        load_config("conf/tldr_cpu.yaml", ["evaluation.judge=gold"])
    assert isinstance(load_config("conf/tiny.yaml", ["evaluation.every_rounds=1"]), RunConfig)


def test_eval_of_a_missing_or_unfinished_run_is_one_error_and_status_2(tmp_path, capsys):
    from rayrlhf.eval import main

    assert main([str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("rounds: 1\n")
    assert main([str(tmp_path)]) == 2
    assert "the run has not finished" in capsys.readouterr().err


def test_the_judged_prompts_come_from_the_named_set_and_an_unknown_name_is_refused():
    from rayrlhf.config import load_config
    from rayrlhf.errors import ConfigError
    from rayrlhf.eval import judged_prompts

    sets = {"held_out": {"prompt": ["a", "b", "a", "c"]}, "target": {"prompt": ["x", "y", "y", "z"]}}
    assert judged_prompts(load_config("conf/tiny.yaml", ["evaluation.prompts=2"]), sets) == ["a", "b"]
    assert judged_prompts(load_config("conf/tiny.yaml", ["evaluation.prompt_set=target"]), sets) == ["x", "y", "z"]
    with pytest.raises(ConfigError, match=r"evaluation.prompt_set='cnndm' is not a preference set of this run; it has: "
                                          r"held_out, target"):
        judged_prompts(load_config("conf/tiny.yaml", ["evaluation.prompt_set=cnndm"]), sets)

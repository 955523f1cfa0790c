"""The verdicts and paired comparisons of the evidence benchmarks (benchmarks/overoptimisation.py,
benchmarks/experiment_a.py) on numbers worked out by hand, and what the experiment scripts plan to run."""
import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def load(name: str):
    # the benchmarks import each other as scripts do, from their own folder
    if str(Path(ROOT) / "benchmarks") not in sys.path:
        sys.path.insert(0, str(Path(ROOT) / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, Path(ROOT) / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


overoptimisation = load("overoptimisation")
experiment_a = load("experiment_a")


def test_overoptimisation_verdict_needs_an_interior_peak_a_rise_a_fall_and_a_rising_fixed_proxy():
    rise_then_fall = {"gold": [1.0, 2.0, 1.5], "fixed": [1.0, 2.0, 3.0]}
    assert overoptimisation.verdict(rise_then_fall) == {
        "overoptimised": True, "peak_round": 2, "rise": 1.0, "fall": 0.5,
        "fixed_proxy_after_peak": 1.0, "fixed_proxy_overall": 2.0}
    assert not overoptimisation.verdict({"gold": [1.0, 2.0, 2.5], "fixed": [1.0, 2.0, 3.0]})["overoptimised"]  # no fall
    assert not overoptimisation.verdict({"gold": [1.0, 1.2, 0.5], "fixed": [1.0, 2.0, 3.0]})["overoptimised"]  # rise < 0.3
    assert not overoptimisation.verdict({"gold": [1.0, 2.0, 1.5], "fixed": [1.0, 3.0, 2.0]})["overoptimised"]  # proxy falls


def test_overoptimisation_arms_and_paired_differences():
    arms = overoptimisation.arms(["vanilla", "metarm"], ["metarm_eta0.1=reward.method=metarm,reward.eta=0.1"])
    assert arms == {"vanilla": ["reward.method=vanilla"], "metarm": ["reward.method=metarm"],
                    "metarm_eta0.1": ["reward.method=metarm", "reward.eta=0.1"]}
    with pytest.raises(SystemExit):
        overoptimisation.arms([], ["no_overrides"])
    a = {0: {"gold": [1.0, 2.0], "acc": [0.5, 0.7]}, 1: {"gold": [1.0, 3.0], "acc": [0.6, 0.6]}}
    b = {0: {"gold": [1.0, 2.5], "acc": [0.6, 0.8]}, 1: {"gold": [2.0, 2.0], "acc": [0.6, 0.6]}}
    final = overoptimisation.paired(a, b)["final_gold"]
    # per seed b - a: +0.5, -1.0; mean -0.25; sample std sqrt(((0.75)^2 + (0.75)^2) / 1) = 1.0607
    assert final["per_seed"] == {0: 0.5, 1: -1.0} and final["mean"] == pytest.approx(-0.25)
    assert final["std"] == pytest.approx(1.06066, abs=1e-5)
    assert (final["seeds_favouring_b"], final["seeds_favouring_a"]) == (1, 1)
    assert overoptimisation.paired(a, b)["peak_gold"]["per_seed"] == {0: 0.5, 1: -1.0}
    assert overoptimisation.paired(a, b)["mean_gold_pair_accuracy"]["per_seed"] == pytest.approx({0: 0.1, 1: 0.0})


def test_experiment_a_pairs_metarm_with_vanilla_of_the_same_seed():
    def run(variant, seed, target):
        return experiment_a.Run("hh-helpful-harmless", variant, seed, [], Path("."), {"target_accuracy": target})

    runs = [run("vanilla", 0, 0.50), run("vanilla", 1, 0.60), run("metarm", 0, 0.55), run("metarm", 1, 0.58),
            run("metarm", 2, 0.90), run("bilevel", 1, 0.70)]  # seed 2 has no vanilla partner: left out
    metarm, bilevel = experiment_a.paired(runs)
    assert metarm["seeds"] == [0, 1] and metarm["deltas"] == pytest.approx([0.05, -0.02])
    assert metarm["mean"] == pytest.approx(0.015) and (metarm["method_better"], metarm["vanilla_better"]) == (1, 1)
    assert bilevel["variant"] == "bilevel" and bilevel["deltas"] == pytest.approx([0.10])


def test_experiment_a_plans_bilevel_on_each_pairs_domains_and_the_leave_subreddits_out_pair():
    args = experiment_a.parse_args(["--out", "x", "--bilevel", "--seeds", "0", "--pairs", "hh-helpful-harmless", "tldr-subreddits"])
    runs = experiment_a.plan_runs(args, Path("out"))
    assert [(r.pair, r.variant) for r in runs] == [(pair, variant) for pair in ("hh-helpful-harmless", "tldr-subreddits")
                                                   for variant in ("vanilla", "metarm", "bilevel")]
    hh_bilevel, subreddits_bilevel = runs[2], runs[5]
    assert {"reward.method=bilevel", "reward.bilevel.domain_by=none", "reward.bilevel.policy_layers=2"} <= set(hh_bilevel.overrides)
    assert "reward.bilevel.domain_by=subreddit" in subreddits_bilevel.overrides
    assert all("data.preference.exclude_subreddits=[AskReddit, tifu, personalfinance, legaladvice]" in r.overrides for r in runs[3:])


def test_experiment_a_bilevel_variants_add_their_overrides_after_the_bilevel_ones():
    args = experiment_a.parse_args(["--out", "x", "--no-metarm", "--seeds", "1", "--pairs", "tldr-subreddits",
                                    "--bilevel-variant", "vw1=reward.bilevel.vanilla_weight=1;reward.bilevel.inner_lr=1e-3"])
    vanilla, variant = experiment_a.plan_runs(args, Path("out"))
    assert (vanilla.variant, variant.variant) == ("vanilla", "bilevel:vw1")
    assert variant.run_dir == Path("out/runs/tldr-subreddits/bilevel_vw1/seed1")
    method = variant.overrides[variant.overrides.index("reward.method=bilevel"):]
    assert method[-4:] == ["reward.bilevel.vanilla_weight=1", "reward.bilevel.inner_lr=1e-3", "seed=1",
                           f"run_dir={variant.run_dir}"]
    with pytest.raises(SystemExit) as exit_status:
        experiment_a.parse_variant("vw1")
    assert exit_status.value.code == 2


def test_ood_policy_meta_test_trains_each_proxy_by_its_method_and_ppo_on_the_target_prompts():
    ood_policy = load("ood_policy")
    args = ood_policy.parse_args(["--setting", "tldr-cnndm", "--out", "x", "--rm-methods", "vanilla", "metarm", "bilevel",
                                  "--ppo-prompts", "target"])
    setting = ood_policy.SETTINGS["tldr-cnndm"]
    vanilla, metarm, bilevel = (ood_policy.proxy_overrides(setting, m, 30) for m in args.rm_methods)
    assert vanilla[:2] == ["reward.method=vanilla", "data.meta=null"] and "reward.max_steps=30" in vanilla
    assert "reward.method=metarm" in metarm and "data.meta=null" not in metarm  # meta data: the config's target domain
    assert {"reward.method=bilevel", "reward.bilevel.domain_by=subreddit", "policy.source=smollm2"} <= set(bilevel)
    command = ood_policy.run_command(setting, "ppo", 3, "P", Path("r"), args)
    assert command[-1] == "data.preference={format: tldr, path: data/tldr/comparisons_cnndm0.jsonl}"
    assert {"reward_model={source: P}", "seed=3", "reward.train_each_round=false"} <= set(command)
    assert ood_policy.run_key("ppo", "bilevel") == "ppo+bilevel" and ood_policy.run_key("gil", "vanilla") == "gil"


def test_compare_runs_ignores_what_the_machine_measured_and_finds_the_rest(tmp_path):
    compare_runs = load("compare_runs")
    lines = {"a": ['{"phase": "ppo", "step": 1, "reward_mean": 0.5, "ppo_seconds": 1.0, "peak_memory_gb_ppo": 2.0}',
                   '{"phase": "checkpoint", "step": 1, "checkpoint_seconds": 0.3}'],
             "b": ['{"phase": "ppo", "step": 1, "reward_mean": 0.5, "ppo_seconds": 9.0, "peak_memory_gb_ppo": 3.0}'],
             "c": ['{"phase": "ppo", "step": 1, "reward_mean": 0.25, "ppo_seconds": 1.0}']}
    for name, records in lines.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(records) + "\n")
    a, b, c = (compare_runs.comparable_records(tmp_path / name) for name in "abc")
    assert compare_runs.differences(a, b) == []
    assert compare_runs.differences(a, c) == ["record 0 (ppo 1): reward_mean 0.5 != 0.25"]

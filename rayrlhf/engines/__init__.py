"""The rollout engines: batched sampling from a transformers causal LM (`generation`, with fixed-size KV-cache
decoding in `static_decoding` and the samplers in `sampling`) and vLLM (`vllm_engine`, its top-p in `vllm_nucleus`),
both behind the same `generate`, both taking new weights in place."""

"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling with a seeded generator."""
import torch


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) logits with -inf outside the nucleus: the fewest most-likely tokens whose probability sums to
    >= top_p (the top token always kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) tokens from (B, V) logits: argmax at temperature 0, else a nucleus sample at `temperature`.

    Sampling is argmax(p / E) with E ~ Exponential(1) drawn per token: token v wins with probability p_v
    (the exponential race), in a few elementwise kernels where torch.multinomial launches more on GPU."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits / temperature, top_p).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)

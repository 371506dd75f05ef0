"""Sampling: temperature → top-k → top-p gives exactly the distribution of a full float64 sort of the vocabulary,
while sorting only the candidates top-k / top-p need."""
import numpy as np
import paddle
import pytest

from llava_ui.config import GenerationSettings
from llava_ui.model.sampling import sample_next, sampling_distribution

VOCAB = 151_646


def full_sort_reference(logits: np.ndarray, settings: GenerationSettings) -> dict[int, float]:
    """The textbook order of operations over the whole vocabulary in float64 (what sample_next did before)."""
    scores = logits.astype(np.float64) / settings.temperature
    if settings.top_k and settings.top_k < scores.size:
        kth = np.partition(scores, -settings.top_k)[-settings.top_k]
        scores[scores < kth] = -np.inf
    order = np.argsort(-scores, kind="stable")
    probs = np.exp(scores[order] - scores[order[0]])
    probs /= probs.sum()
    if settings.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), settings.top_p) + 1)
        probs, order = probs[:keep] / probs[:keep].sum(), order[:keep]
    return {int(i): float(p) for i, p in zip(order, probs) if p > 0}


def as_dict(ids, probs) -> dict[int, float]:
    return {int(i): float(p) for i, p in zip(ids, probs) if p > 0}


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (0.2, 0, 1.0), (1.0, 0, 1.0), (0.7, 50, 1.0), (0.7, 0, 0.9), (1.0, 0, 0.999), (0.5, 40, 0.8), (2.0, 0, 0.95),
    (1.0, 1, 1.0)])
def test_distribution_equals_a_full_float64_sort(temperature, top_k, top_p):
    rng = np.random.default_rng(top_k + int(100 * top_p))
    logits = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
    logits[rng.integers(0, VOCAB, 20)] += 12  # a few likely tokens, as a language model has
    settings = GenerationSettings(temperature=temperature, top_k=top_k, top_p=top_p)
    expected = full_sort_reference(logits, settings)
    got = as_dict(*sampling_distribution(logits, settings))
    dense_expected, dense_got = np.zeros(VOCAB), np.zeros(VOCAB)
    dense_expected[list(expected)] = list(expected.values())
    dense_got[list(got)] = list(got.values())
    assert np.abs(dense_got - dense_expected).max() < 1e-6
    if top_k or top_p < 1.0:  # the same tokens cut off (without a cut, float32 rounds 1e-40 to 0 where float64 does not)
        assert got.keys() == expected.keys()


def test_top_p_beyond_the_first_candidates_still_finds_its_prefix():
    """A flat distribution: top-p needs far more than the first 256 candidates."""
    logits = np.linspace(0, 0.01, VOCAB, dtype=np.float32)
    settings = GenerationSettings(temperature=1.0, top_p=0.5)
    expected = full_sort_reference(logits, settings)
    got = as_dict(*sampling_distribution(logits, settings))
    assert len(expected) > 10_000 and got.keys() == expected.keys()


def test_ties_at_the_kth_score_all_stay():
    logits = np.zeros(1000, np.float32)
    logits[:5] = 3.0
    ids, probs = sampling_distribution(logits, GenerationSettings(temperature=1.0, top_k=3))
    assert sorted(ids.tolist()) == [0, 1, 2, 3, 4] and np.allclose(probs, 0.2)


def test_samples_follow_the_distribution_and_the_seed():
    logits = np.full(5000, -30.0, np.float32)
    logits[[7, 99, 4321]] = [2.0, 1.0, 0.0]
    settings = GenerationSettings(temperature=1.0, seed=3)
    tensor = paddle.to_tensor(logits)

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [sample_next(tensor, settings, [], rng) for _ in range(3000)]

    first = draws(3)
    assert first == draws(3)
    counts = {t: first.count(t) / len(first) for t in (7, 99, 4321)}
    exact = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    assert all(abs(counts[t] - p) < 0.03 for t, p in zip((7, 99, 4321), exact))
    assert set(first) <= {7, 99, 4321}

"""The Qwen2 runner's execution strategies compute the same function: one part or one per worker, whole prompt or
chunks, the CPU's blockwise attention or the fused kernel a GPU uses, prefill or step-by-step decoding; and a long
prefill is one model step per chunk.
(tests/test_parity.py compares the default strategy with transformers.)"""

import numpy as np
import paddle
import pytest

from llava_ui.checkpoints.load import build_model
from llava_ui.config import GenerationSettings
from llava_ui.model import cpu as parallel
from llava_ui.model import attention, kv_cache, qwen2 as language
from llava_ui.model.cpu import configure_cpu
from llava_ui.engine.steps import Decoding, generate_ids, prefill
from cpu_kinds import needs_avx512

LENGTH = 41


@pytest.fixture(scope="module")
def tiny(checkpoints):
    model, _, _ = build_model(checkpoints("lmms"))
    embeds = paddle.to_tensor(np.random.default_rng(3).standard_normal((1, LENGTH, 64)).astype(np.float32))
    return model, embeds


def hidden_and_cache(model, embeds):
    with paddle.no_grad():
        hidden, cache = model.forward_hidden(embeds)
    return hidden.numpy(), cache


def test_the_model_is_split_over_the_workers(tiny):
    model, _ = tiny
    attention, feed = model.runner.parts[0]
    assert len(attention) == len(feed) == min(parallel._workers, 2)  # tiny: 2 kv heads
    assert all(layer.self_attn.q_proj.weight is None for layer in model.language_model.qwen2.layers)


def test_chunked_prefill_and_small_blocks_equal_one_pass(tiny, monkeypatch):
    model, embeds = tiny
    whole, cache = hidden_and_cache(model, embeds)
    monkeypatch.setattr(language, "PREFILL_CHUNK", 9)
    monkeypatch.setattr(attention, "BLOCK", 4)
    chunked, chunked_cache = hidden_and_cache(model, embeds)
    assert np.abs(whole - chunked).max() <= 1e-5
    assert chunked_cache.length == cache.length == LENGTH
    for ours, theirs in zip(cache.keys + cache.values, chunked_cache.keys + chunked_cache.values):
        assert np.abs(ours.numpy() - theirs.numpy()).max() <= 1e-5


def test_fused_attention_path_equals_the_blockwise_one(tiny, monkeypatch):
    """The GPU's scaled_dot_product_attention path, run on the CPU: same outputs, with and without a cached prefix."""
    model, embeds = tiny
    whole, _ = hidden_and_cache(model, embeds)
    _, prefix = hidden_and_cache(model, embeds[:, :30])
    monkeypatch.setattr(model.runner, "fused_attention", True)
    fused, _ = hidden_and_cache(model, embeds)
    with paddle.no_grad():
        rest, _ = model.forward_hidden(embeds[:, 30:], prefix.prefix(30), 30)
    assert np.abs(whole - fused).max() <= 1e-5
    assert np.abs(whole[:, 30:] - rest.numpy()).max() <= 1e-5


def test_one_part_equals_one_part_per_worker(checkpoints, tiny, monkeypatch):
    model, embeds = tiny
    split, _ = hidden_and_cache(model, embeds)
    monkeypatch.setenv("LLAVA_UI_THREADS", "1")
    try:
        single, _, _ = build_model(checkpoints("lmms"))
    finally:
        monkeypatch.delenv("LLAVA_UI_THREADS")
        configure_cpu()
    assert len(single.runner.parts[0][0]) == 1
    whole, _ = hidden_and_cache(single, embeds)
    assert np.abs(whole - split).max() <= 1e-5


def test_decoding_position_by_position_equals_the_prefill(tiny):
    model, embeds = tiny
    whole, _ = hidden_and_cache(model, embeds)
    _, cache = hidden_and_cache(model, embeds[:, :LENGTH - 3])
    with paddle.no_grad():
        for position in range(LENGTH - 3, LENGTH):
            step, cache = model.forward_hidden(embeds[:, position:position + 1], cache, position)
            assert np.abs(step.numpy()[0, 0] - whole[0, position]).max() <= 1e-5


class CountingRunner:
    """An engine-like `run`: records how many model steps it was handed."""

    def __init__(self):
        self.taken = 0

    def __call__(self, fn, *args):
        self.taken += 1
        return fn(*args)


def test_a_long_prefill_is_one_model_step_per_chunk(tiny, monkeypatch):
    """Each chunk is handed over as its own step (other requests' steps run between) and a stop request is
    looked at between them and between the layers within each."""
    model, embeds = tiny
    monkeypatch.setattr(language, "PREFILL_CHUNK", 10)
    chunks = -(-LENGTH // 10)
    run, asked = CountingRunner(), []
    logits, cache = prefill(model, embeds, run=run, should_stop=lambda: asked.append(1) and False)
    assert run.taken == chunks + 2  # the cache reservation, each chunk, the logits
    layers = len(model.language_model.qwen2.layers)
    assert len(asked) == (chunks - 1) + chunks * layers and cache.length == LENGTH
    monkeypatch.setattr(language, "PREFILL_CHUNK", LENGTH)
    whole, _ = prefill(model, embeds)
    assert np.abs(logits.numpy() - whole.numpy()).max() <= 1e-5


def test_stop_during_a_long_prefill_ends_it_within_the_current_chunk(tiny, monkeypatch):
    model, embeds = tiny
    monkeypatch.setattr(language, "PREFILL_CHUNK", 10)
    logits, cache = prefill(model, embeds, should_stop=lambda: True)
    assert logits is None and cache.length == 0  # asked before the first layer of the first chunk
    tokens = list(generate_ids(model, embeds, GenerationSettings(max_new_tokens=3, temperature=0), set(),
                               should_stop=iter([False, True]).__next__))
    assert tokens == []  # stopped inside the first chunk: no token


def test_prefill_reserves_the_answer_up_front_so_decoding_never_copies_the_cache(tiny, monkeypatch):
    """generate_ids asks the prefill for room to decode into (up to HEADROOM positions): the cache made for the
    prompt is the one every step writes to, and only as big as prompt + answer rounded up."""
    model, embeds = tiny
    new_tokens = 30  # prompt + answer cross a 64-position boundary: without the room the cache would grow
    grown = []
    writable = language.KVCache.writable

    def recording(self, needed):
        if needed > self.capacity:
            grown.append(needed)
        return writable(self, needed)

    monkeypatch.setattr(language.KVCache, "writable", recording)
    state = Decoding()
    tokens = list(generate_ids(model, embeds, GenerationSettings(max_new_tokens=new_tokens, temperature=0), set(),
                               state=state))
    assert len(tokens) == new_tokens and grown == []
    assert LENGTH + new_tokens <= state.cache.capacity == kv_cache.round_up(LENGTH + new_tokens)


def test_a_cache_grows_in_place_and_a_prefix_view_made_before_keeps_its_buffers(tiny):
    model, embeds = tiny
    _, cache = hidden_and_cache(model, embeds)
    view = cache.prefix(LENGTH)
    before = [t.numpy() for t in cache.keys + cache.values]
    old_capacity = cache.capacity
    grown = cache.writable(old_capacity + 1)
    assert grown is cache and cache.capacity == kv_cache.round_up(old_capacity + 1 + kv_cache.HEADROOM)
    assert view.capacity == old_capacity  # the view's buffers are the old ones, untouched
    for old, new, kept in zip(before, cache.keys + cache.values, view.keys + view.values):
        heads = cache.kv_heads
        new = new.numpy().reshape([heads, cache.capacity, -1])[:, :old_capacity].reshape(old.shape)
        assert np.array_equal(old, new) and np.array_equal(old, kept.numpy())
    with paddle.no_grad():  # decoding on in the grown cache equals decoding in the original capacity
        step, _ = model.forward_hidden(embeds[:, -1:], cache.prefix(LENGTH - 1).writable(LENGTH), LENGTH - 1)
        again, _ = model.forward_hidden(embeds[:, -1:], view.prefix(LENGTH - 1).writable(LENGTH), LENGTH - 1)
    assert np.abs(step.numpy() - again.numpy()).max() <= 1e-6


def test_a_short_chat_reusing_the_start_of_a_long_cached_prompt_gets_a_cache_of_its_own_size(tiny):
    """A shared prefix is copied at the size the new prompt asks for, not at the long cached prompt's capacity:
    a decode step attends over the whole buffer, so a 200-token chat on a 3,000-position copy decoded at half
    speed (and held 12x the memory) after an image request in the same server."""
    model, embeds = tiny
    _, cache = hidden_and_cache(model, embeds)
    cache = cache.writable(300)  # a long cached prompt's capacity
    short = cache.prefix(5).writable(20)  # its first 5 positions shared, room for 20
    assert short.capacity == kv_cache.round_up(20) < cache.capacity and not short.shared
    for old, new in zip(cache.keys + cache.values, short.keys + short.values):
        heads = cache.kv_heads
        old = old.numpy().reshape([heads, cache.capacity, -1])
        new = new.numpy().reshape([heads, short.capacity, -1])
        assert np.array_equal(old[:, :5], new[:, :5]) and not new[:, 5:].any()
    with paddle.no_grad():  # decoding after the short copy equals decoding after the long cache's own prefix
        step, _ = model.forward_hidden(embeds[:, 5:6], short, 5)
        again, _ = model.forward_hidden(embeds[:, 5:6], cache.prefix(5).writable(cache.capacity), 5)
    assert np.abs(step.numpy() - again.numpy()).max() <= 1e-6


def test_memory_freed_by_a_chunk_goes_back_before_the_next(tiny, monkeypatch):
    import llava_ui.engine.steps as generate

    model, embeds = tiny
    monkeypatch.setattr(language, "PREFILL_CHUNK", 10)
    trims = []
    monkeypatch.setattr(generate, "release_free_memory", lambda: trims.append(1))
    prefill(model, embeds)
    assert len(trims) == -(-LENGTH // 10) + 1  # before every chunk, and once after the prefill


def test_avx512_is_read_from_the_cpu_flags():
    from llava_ui.model.cpu import has_avx512

    assert has_avx512("flags\t: fpu sse avx2 avx512f avx512bw\n")
    assert not has_avx512("flags\t: fpu sse avx2 fma\n")  # an AMD EPYC of the Zen 3 generation
    assert not has_avx512("")  # no /proc/cpuinfo: the plain kernel, which runs anywhere


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_avx512)], ids=["plain", "fused"])
def test_rms_norm_normalises_the_last_axis_of_any_rank(monkeypatch, fused, with_residual):
    """Both paths of rms_norm (the plain kernels every CPU runs; Paddle's fused kernel, AVX-512 only) give
    RMSNorm over the last axis for 1-, 2- and 3-D input, and the sum they normalised."""
    import paddle

    from llava_ui.model import qwen2

    monkeypatch.setattr(qwen2, "FUSED_CPU_NORM", fused)
    rng = np.random.default_rng(3)
    weight = rng.standard_normal(64).astype(np.float32)
    for shape in ((64,), (5, 64), (2, 5, 64)):
        x, residual = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
        total = x + residual if with_residual else x
        expected = weight * total / np.sqrt(np.mean(total.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-6)
        normed, summed = qwen2.rms_norm(paddle.to_tensor(x), paddle.to_tensor(weight), 1e-6,
                                        paddle.to_tensor(residual) if with_residual else None)
        assert normed.shape == list(shape)
        assert np.abs(normed.numpy() - expected).max() < 1e-5
        assert np.array_equal(summed.numpy(), total)


class _TiedHead:  # what head_logits reads of paddlenlp's tied LM head: the embedding [vocab, hidden], transpose_y
    def __init__(self, weight):
        self.weight, self.transpose_y = weight, True


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
def test_the_lm_head_in_blocks_gives_every_row_its_logits(monkeypatch, rows):
    """A few rows (a batched decode step) go through the tied head in blocks of vocabulary rows: blocks of 64 over
    a vocabulary of 1,000 (the last block partial, split over the workers) give each row its product, in float64
    terms, and what that row alone gets."""
    monkeypatch.setattr(language, "HEAD_BLOCK", 64)
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((1000, 48)).astype(np.float32)
    hidden = rng.standard_normal((rows, 48)).astype(np.float32)
    head = _TiedHead(paddle.to_tensor(weight))
    logits = language.head_logits(head, paddle.to_tensor(hidden)).numpy()
    assert logits.shape == (rows, 1000)
    np.testing.assert_allclose(logits, hidden.astype(np.float64) @ weight.astype(np.float64).T, rtol=0, atol=1e-4)
    for i in range(rows):
        alone = language.head_logits(head, paddle.to_tensor(hidden[i:i + 1])).numpy()[0]
        np.testing.assert_allclose(logits[i], alone, rtol=0, atol=1e-5)

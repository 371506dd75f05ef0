"""Concurrent chats share decode steps: one batched step per token for every chat that is decoding (each with its
own KV cache and length), with the answers each chat gets alone."""
import threading

import numpy as np
import paddle
import pytest

from llava_ui.engine import Engine
from llava_ui.chat.conversation import Conversation
from llava_ui.checkpoints.load import build_model
from llava_ui.config import GenerationSettings
from llava_ui.engine.steps import decode_one_token, prefill
from llava_ui.model.packed import PackedMatrix

TOKENS = 24


@pytest.fixture(scope="module")
def engine(tiny_dir):
    engine = Engine(str(tiny_dir), dtype="float32").load()
    engine.tokenizer.stop_ids = set()  # every answer runs its full length: the chats overlap for sure
    return engine


def ask(engine, i: int, settings=None, stop_event=None):
    conversation = Conversation()
    conversation.add_user(f"question {i}: " + "tell me more " * (3 * i + 1))  # prompts of different lengths
    return engine.generate(conversation, settings or GenerationSettings(max_new_tokens=TOKENS, temperature=0),
                           stop_event=stop_event)


def at_once(fn, count: int) -> list:
    results = [None] * count

    def one(i):
        results[i] = fn(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def batched_against_solo(model, lengths, vocab: int) -> float:
    """Prompts of these lengths prefilled; one decode step each alone and all in one batched step: the largest
    |Δlogit| / max |logit| over the sequences."""
    rng = np.random.default_rng(0)
    caches, tokens = [], []
    for length in lengths:
        embeds = model.embed_tokens(paddle.to_tensor(rng.integers(0, vocab, length).tolist())).unsqueeze(0)
        caches.append(prefill(model, embeds, room=4)[1])
        tokens.append(int(rng.integers(0, vocab)))
    solo = [decode_one_token(model, t, c.prefix(p), p)[0].numpy() for t, c, p in zip(tokens, caches, lengths)]
    batched, _ = model.decode_batch(tokens, [c.prefix(p) for c, p in zip(caches, lengths)], list(lengths))
    return max(float(np.abs(batched[row].numpy() - expected).max() / np.abs(expected).max())
               for row, expected in enumerate(solo))


LAYOUTS = ["in-out", "out-in", "packed"]


def tiny_model(checkpoints, layout):
    return build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None, layout)[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_batched_step_gives_each_sequence_its_solo_logits(checkpoints, layout):
    """decode_batch over caches of different lengths equals decode_one_token per sequence (fp32), in every weight
    layout; 2, 3 and 5 rows take the three ways linear.project computes a few rows."""
    model = tiny_model(checkpoints, layout)
    part = model.runner.parts[0][1][0]
    assert (part.transposed, part.packed) == (layout == "out-in", layout == "packed")
    assert batched_against_solo(model, (5, 40), 200) <= 1e-5
    assert batched_against_solo(model, (5, 40, 300), 200) <= 1e-5
    assert batched_against_solo(model, (5, 40, 300, 7, 90), 200) <= 1e-5


def test_packed_weights_give_each_row_of_a_step_its_hidden_state_alone_bit_for_bit(checkpoints):
    """With the weights packed for MKL, a batched step's rows (2 to 5 of them) are exactly the same step taken
    alone: the batch changes nothing in any row."""
    model = tiny_model(checkpoints, "packed")
    rng = np.random.default_rng(4)
    lengths = (5, 40, 300, 7, 90)
    caches = []
    for length in lengths:
        _, cache = prefill(model, model.embed_tokens(paddle.to_tensor(rng.integers(0, 200, length))).unsqueeze(0),
                           room=2)
        caches.append(cache)
    tokens = rng.integers(0, 200, len(lengths)).tolist()
    embeds = model.embed_tokens(paddle.to_tensor(tokens, dtype="int64"))
    alone = [model.runner.decode_batch(embeds[i:i + 1], [caches[i].prefix(n)], [n])[0].numpy()[0]
             for i, n in enumerate(lengths)]
    for rows in (2, 3, 4, 5):
        hidden, _ = model.runner.decode_batch(embeds[:rows], [c.prefix(n) for c, n in zip(caches, lengths)][:rows],
                                              list(lengths[:rows]))
        assert all(np.array_equal(hidden.numpy()[i], alone[i]) for i in range(rows)), rows


@pytest.mark.parametrize("layout", ["out-in", "packed"])
def test_the_batching_layouts_compute_the_as_stored_layouts_logits(checkpoints, layout):
    """The weights laid out for batched steps give the prefill and a decode step the logits of the layout as
    stored (the prompt long enough for two prefill chunks)."""
    def run(layout):
        model = tiny_model(checkpoints, layout)
        tokens = np.random.default_rng(1).integers(0, 200, 300).tolist()
        logits, cache = prefill(model, model.embed_tokens(paddle.to_tensor(tokens)).unsqueeze(0), room=2)
        return logits.numpy(), decode_one_token(model, 7, cache, 300)[0].numpy()

    for stored, batching in zip(run("in-out"), run(layout)):
        assert np.abs(stored - batching).max() <= 1e-5 * np.abs(stored).max()


def test_the_engine_lays_the_weights_out_for_what_it_runs(tiny_dir, engine, monkeypatch):
    """Batched decode steps get the [out, in] layout (packed for MKL when asked); an engine that runs one request
    at a time (the command line, eval --parallel 1) keeps the weights as stored, the faster layout for one
    stream."""
    assert engine.status()["weight_layout"] == "out-in"
    one = Engine(str(tiny_dir), dtype="float32", feature_cache_mb=1, batch_slots=1)
    assert one.load().status()["weight_layout"] == "in-out"
    assert one.status()["options"]["batch_slots"] == 1 and one.compute.batch_limit == 1
    monkeypatch.setenv("LLAVA_UI_BATCH_LAYOUT", "packed")
    asked = Engine(str(tiny_dir), dtype="float32", feature_cache_mb=1)
    assert asked.load().status()["weight_layout"] == "packed"
    first = asked.model.runner.parts[0][1][0]
    assert isinstance(first.gate_up, PackedMatrix) and first.packed


def test_a_bad_weight_layout_is_refused(checkpoints):
    with pytest.raises(ValueError, match="weight layout 'sideways'"):
        tiny_model(checkpoints, "sideways")


def test_concurrent_greedy_chats_get_their_solo_answers_and_share_steps(engine):
    solo = [ask(engine, i).token_ids for i in range(4)]
    results = at_once(lambda i: ask(engine, i), 4)
    assert [r.token_ids for r in results] == solo
    assert max(r.stats.decode_batch_max for r in results) >= 2  # the steps were shared
    assert all(len(r.token_ids) == TOKENS for r in results)


def test_a_stopped_chat_leaves_the_batch_and_the_others_go_on(engine):
    solo = [ask(engine, i).token_ids for i in range(3)]
    stop = threading.Event()
    seen = []

    def chat(i):
        if i != 1:
            return ask(engine, i)
        conversation = Conversation()
        conversation.add_user("question 1: " + "tell me more " * 4)
        for event in engine.stream(conversation, GenerationSettings(max_new_tokens=TOKENS, temperature=0),
                                   stop_event=stop):
            seen.append(event)
            if sum(1 for e in seen if hasattr(e, "text") and not hasattr(e, "finish_reason")) == 3:
                stop.set()
        return seen[-1]

    results = at_once(chat, 3)
    assert results[1].finish_reason == "stopped" and len(results[1].token_ids) < TOKENS
    assert results[0].token_ids == solo[0] and results[2].token_ids == solo[2]


def test_the_batch_size_limit_holds(engine):
    engine.compute.batch_limit = 2
    try:
        results = at_once(lambda i: ask(engine, i), 4)
    finally:
        engine.compute.batch_limit = 8
    assert max(r.stats.decode_batch_max for r in results) <= 2


def test_sampled_chats_keep_their_own_seeds(engine):
    settings = [GenerationSettings(max_new_tokens=TOKENS, temperature=1.0, seed=s) for s in (1, 2, 3)]
    solo = [ask(engine, 0, s).token_ids for s in settings]
    results = at_once(lambda i: ask(engine, 0, settings[i]), 3)
    assert [r.token_ids for r in results] == solo


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_real_size_batched_logits_match_solo_within_1e_4(real_checkpoint, layout):
    model, _, _ = build_model(real_checkpoint, "float32", lambda *a, **k: None, layout)
    assert batched_against_solo(model, (40, 300, 760, 1100), 5000) <= 1e-4

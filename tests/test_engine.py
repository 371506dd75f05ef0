"""The singleton streaming engine: load once, stream, stop, concurrency, caches, seeds, context budget."""
import threading

import numpy as np
import paddle
import pytest
from PIL import Image

from cpu_kinds import kernels_or_skip, machine_engines
from llava_ui.backends.base import Delta, Result
from llava_ui.engine import Engine
from llava_ui.chat.conversation import Conversation
from llava_ui.config import GenerationSettings
from llava_ui.errors import UserError
from llava_ui.engine.steps import Decoding, IncrementalDecoder, generate_ids

GREEDY = GenerationSettings(max_new_tokens=24, temperature=0)


def picture(seed, size=(96, 64)):
    """A colour gradient: different seeds give visibly different images (noise images all look alike)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    pixels = rng.integers(0, 256, 3) + x[..., None] * rng.integers(-3, 4, 3) + y[..., None] * rng.integers(-3, 4, 3)
    return Image.fromarray((pixels % 256).astype(np.uint8))


@pytest.fixture(scope="module", params=machine_engines())
def engine(tiny_dir, request):
    """The engine on each path this CPU can run (bf16 and int8 only where it has bf16 units and the CPU kernels
    build), named, not the host's default."""
    kernels_or_skip(request.param)
    return Engine(str(tiny_dir), **request.param).load()


def chat(text="Describe <image> and <image>.", images=(1, 2)):
    conversation = Conversation()
    conversation.add_user(text, [picture(s) for s in images])
    return conversation


def test_streams_several_increments_that_add_up_to_the_final_text(engine):
    events = list(engine.stream(chat(), GREEDY))
    deltas = [e.text for e in events if isinstance(e, Delta)]
    final = events[-1]
    assert isinstance(final, Result) and len(deltas) > 1
    assert "".join(deltas) == final.text and final.text
    assert final.stats.generated_tokens == len(final.token_ids) == 24
    assert final.finish_reason == "length"
    text_ids = engine.tokenizer.encode_prompt(None, chat().messages())  # two image markers among them
    assert final.stats.prompt_tokens == len(text_ids) - 2 + final.stats.visual_tokens


def test_engine_greedy_equals_the_core_model_greedy(engine):
    conversation = chat()
    final = engine.generate(conversation, GREEDY)
    plan = engine.plan(chat(), max_new_tokens=24)
    rows, _ = engine.image_rows(plan)
    embeds = engine.model.embed_prompt(plan.prompt_ids, rows)
    # in the compute thread, as every model call of the engine (the bf16 vision programs are bound to the thread that made them)
    core = engine.run(lambda: list(generate_ids(engine.model, embeds, GREEDY, engine.tokenizer.stop_ids)))
    assert final.token_ids == core
    assert conversation.turns[-1].answer == final.text


def test_stop_ends_generation_within_one_step_and_keeps_the_partial_answer(engine):
    conversation = chat()
    stop = threading.Event()
    seen = 0
    final = None
    for event in engine.stream(conversation, GenerationSettings(max_new_tokens=500, temperature=0), stop_event=stop):
        if isinstance(event, Delta):
            seen += 1
            if seen == 3:
                stop.set()
        else:
            final = event
    assert final.finish_reason == "stopped"
    assert 3 <= final.stats.generated_tokens <= 4
    assert conversation.turns[-1].answer == final.text != ""


def test_closing_the_stream_stops_the_model(engine):
    conversation = chat()
    stream = engine.stream(conversation, GenerationSettings(max_new_tokens=500, temperature=0))
    next(stream), next(stream)
    before = engine.model.vision_calls
    stream.close()
    assert conversation.turns[-1].answer  # the partial answer is kept
    assert engine.model.vision_calls == before


def test_two_threads_each_get_exactly_their_own_answer(engine):
    alone = [engine.generate(chat(images=(s, s + 1)), GREEDY).token_ids for s in (10, 20)]
    together = [None, None]

    def run(i, s):
        together[i] = engine.generate(chat(images=(s, s + 1)), GREEDY).token_ids

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate((10, 20))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert together == alone and alone[0] != alone[1]


def test_second_turn_reuses_image_features_and_the_kv_prefix(tiny_dir):
    engine = Engine(str(tiny_dir), dtype="float32").load()
    conversation = chat(images=(31, 32))
    engine.generate(conversation, GREEDY)
    calls = engine.model.vision_calls
    conversation.add_user("And what about the colours?")
    second = engine.generate(conversation, GREEDY)
    assert engine.model.vision_calls == calls
    assert second.stats.images_from_cache == 2 and second.stats.images_encoded == 0
    assert second.stats.cached_prefix_tokens > second.stats.visual_tokens
    again = conversation.copy()
    again.edit(len(again.turns) - 1, again.turns[-1].text)  # the last answer cleared, as Regenerate does
    fresh = Engine(str(tiny_dir), dtype=engine.options.dtype).load()  # no caches: the same answer, computed from scratch
    assert fresh.generate(again, GREEDY).token_ids == second.token_ids


def test_same_seed_same_text_different_seed_different_text(engine):
    sampling = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50)
    a = engine.generate(chat(), GenerationSettings(seed=1, **sampling)).text
    b = engine.generate(chat(), GenerationSettings(seed=1, **sampling)).text
    c = engine.generate(chat(), GenerationSettings(seed=2, **sampling)).text
    assert a == b and a != c


def test_context_budget_is_checked_before_any_compute(tiny_dir):
    small = Engine(str(tiny_dir), dtype="float32", context_length=2000).load()
    calls = small.model.vision_calls
    conversation = Conversation()
    conversation.add_user("Many pictures", [picture(s) for s in range(4)])
    with pytest.raises(UserError, match=r"needs 2,9\d\d tokens .*context holds 2,000.*room for at most 2 images"):
        small.generate(conversation, GREEDY)
    assert small.model.vision_calls == calls


def test_old_turns_are_dropped_when_the_history_no_longer_fits(tiny_dir):
    small = Engine(str(tiny_dir), dtype="float32", context_length=1700).load()
    conversation = Conversation()
    for s in range(3):
        conversation.add_user("Look <image>", [picture(s)])
        final = small.generate(conversation, GenerationSettings(max_new_tokens=4, temperature=0))
    assert final.dropped_turns == 1 and final.prompt.count("<image>") == 2


def test_undo_regenerate_and_edit(engine):
    conversation = chat()
    first = engine.generate(conversation, GREEDY).text
    conversation.edit(len(conversation.turns) - 1, conversation.turns[-1].text)
    assert engine.generate(conversation, GREEDY).text == first
    conversation.add_user("Second question")
    engine.generate(conversation, GREEDY)
    assert conversation.undo().text == "Second question" and len(conversation.turns) == 1
    conversation.add_user("Third")
    engine.generate(conversation, GREEDY)
    conversation.edit(0, "Only <image> and <image> now")
    assert len(conversation.turns) == 1 and conversation.turns[0].answer is None
    assert "Only <image> and <image> now" in engine.generate(conversation, GREEDY).prompt


class ScriptedModel:
    """A stand-in whose next token follows a script, to test the loop's stop handling exactly."""

    def __init__(self, script, vocab=10):
        self.script, self.vocab, self.calls = list(script), vocab, 0

    def embed_tokens(self, ids):
        return paddle.zeros([1, 1, 2])

    def prefill_chunk(self, embeds):
        return embeds.shape[1]

    def reserve(self, cache, positions):
        return cache

    def forward_hidden(self, embeds, cache=None, start=0, should_stop=None):
        self.calls += 1
        return paddle.zeros([1, embeds.shape[1], 2]), cache

    def logits(self, hidden):
        token = self.script[min(self.calls - 1, len(self.script) - 1)]
        return paddle.to_tensor(np.eye(self.vocab, dtype=np.float32)[token][None])

    def decode_batch(self, tokens, caches, positions):
        self.calls += 1
        return self.logits(None), caches


def test_generation_stops_at_im_end_and_endoftext_without_yielding_them():
    for stop in (7, 8):
        model = ScriptedModel([3, 4, stop, 5])
        state = Decoding()
        out = list(generate_ids(model, paddle.zeros([1, 5, 2]), GREEDY, {7, 8}, state=state))
        assert out == [3, 4] and state.finish == "stop"


def test_incremental_decoder_never_splits_multibyte_characters(engine):
    text = "héllo 你好 🙂 ok"
    ids = engine.tokenizer.encode_text(text)
    assert len(ids) > len(text)  # the byte-level test vocabulary splits characters across tokens
    decoder = IncrementalDecoder(engine.tokenizer.decode)
    pieces = [decoder.push(t) for t in ids] + [decoder.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stop_strings_cut_the_answer(engine):
    baseline = engine.generate(chat(), GREEDY).text
    marker = baseline[5:9]
    final = engine.generate(chat(), GenerationSettings(max_new_tokens=24, temperature=0, stop=(marker,)))
    assert final.finish_reason == "stop" and final.text == baseline[:baseline.index(marker)]


def test_failed_load_is_reported_and_can_be_retried(tmp_path, tiny_dir):
    import shutil

    target = tmp_path / "model"
    engine = Engine(str(target), dtype="float32")
    with pytest.raises(UserError, match="failed to load"):
        engine.load()
    assert engine.status()["state"] == "failed" and "does not exist" in engine.status()["error"]
    shutil.copytree(tiny_dir, target)
    assert engine.load().status()["state"] == "ready"


def test_concurrent_first_requests_load_once(tiny_dir, monkeypatch):
    import llava_ui.engine.engine as checkpoints  # the engine's own reference to build_model

    builds = []
    real = checkpoints.build_model

    def counting(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "build_model", counting)
    engine = Engine(str(tiny_dir), dtype="float32")
    threads = [threading.Thread(target=engine.load) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(builds) == 1 and engine.status()["state"] == "ready"
    assert engine.status()["random_weights"] is True


def test_stop_before_the_prompt_is_computed_skips_the_model(engine):
    stop = threading.Event()
    stop.set()
    calls = engine.model.vision_calls
    conversation = chat(images=(41, 42))
    final = engine.generate(conversation, GREEDY, stop_event=stop)
    assert final.finish_reason == "stopped" and final.token_ids == []
    assert engine.model.vision_calls == calls and conversation.turns[-1].answer == ""
    conversation.edit(len(conversation.turns) - 1, conversation.turns[-1].text)
    assert engine.generate(conversation, GREEDY).finish_reason == "length"  # the next request works


def test_overlong_message_is_refused_with_the_limit():
    with pytest.raises(UserError, match="100,000 characters long; the limit is 20,000"):
        Conversation().add_user("x" * 100_000)


def test_a_one_frame_video_is_square_padded_not_tiled_in_trained_mode(engine):
    from llava_ui.chat.media import Frame, Video

    conversation = Conversation()
    conversation.add_user("What is this?", [], Video([Frame(picture(50, (900, 300)), 0, 0.0)], 1, 10.0))
    plan = engine.plan(conversation, image_mode="trained")
    assert [(p.view, p.tokens) for p in plan.images] == [("square", 730)]
    photo = Conversation()
    photo.add_user("What is this?", [picture(50, (900, 300))])
    assert engine.plan(photo, image_mode="trained").images[0].view == "anyres"


def test_incremental_decoder_streams_invalid_bytes_instead_of_holding_them_forever(engine):
    invalid = engine.tokenizer.encode_text("\u00e9")[:1] * 12  # a lone UTF-8 lead byte, twelve times
    decoder = IncrementalDecoder(engine.tokenizer.decode)
    released = [decoder.push(t) for t in invalid]
    assert sum(1 for piece in released if piece) >= 2
    assert "".join(released) + decoder.finish() == engine.tokenizer.decode(invalid)


def test_the_engine_reports_the_options_it_computes_with(engine):
    """One typed options object, chosen at load, is what status(), /v1/models and each answer's stats report; on
    the bf16 kernel path the language model is held packed in bf16 (or int8, --weights int8) and the KV cache is
    bf16."""
    options = engine.status()["options"]
    kernel = options["dtype"] == "bfloat16"  # (a CPU computes in bf16 on the kernels only)
    assert options["dtype"] == engine.options.dtype and options["batch_slots"] == engine.compute.batch_limit == 8
    kernel_layout = "int8" if engine.weights == "int8" else "bf16"
    assert options["weight_layout"] == engine.model.runner.layout == (kernel_layout if kernel else "out-in")
    cache = engine.run(engine.model.reserve, None, 16)
    assert str(cache.keys[0].dtype).endswith("bfloat16" if kernel else "float32") and options["kv_cache"] == (
        "bfloat16" if kernel else "float32")
    final = list(engine.stream(chat(), GenerationSettings(max_new_tokens=2, temperature=0)))[-1]
    assert final.stats.weights == f"{options['weights']}; KV cache {options['kv_cache']}"

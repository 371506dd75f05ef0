"""The served path: compute in one thread with grad off whoever calls, progress before the first token (engine,
chat, API, remote front end, command line), stop between vision views, and the time estimates behind them."""
import json
import threading
import time

import httpx
import numpy as np
import openai
import paddle
import pytest
from PIL import Image
from servers import serve_api
from test_api import data_url

from llava_ui.backends.base import Delta, Progress, Result
from llava_ui.engine.scheduler import ComputeThread
from llava_ui.engine import Engine
from llava_ui.backends.rates import Rates, Workload, human_seconds
from llava_ui.backends.remote import RemoteEngine
from llava_ui.chat.conversation import Conversation
from llava_ui.chat.media import Frame, Video
from llava_ui.config import GenerationSettings
from llava_ui.model import cpu as parallel
from llava_ui.model import qwen2 as language
from llava_ui.web.handlers import ChatHandlers
from llava_ui.web.session import ChatSession

GREEDY = GenerationSettings(max_new_tokens=4, temperature=0)


def picture(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def clip(count: int, seed: int = 0) -> Video:
    return Video([Frame(picture(seed + i), i, i / 10) for i in range(count)], total_frames=count, fps=10.0)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(str(tiny_dir), dtype="float32").load()


def video_chat(frames: int = 3, seed: int = 0, text: str = "What happens?") -> Conversation:
    conversation = Conversation()
    conversation.add_user(text, [], clip(frames, seed))
    return conversation


def in_new_thread(fn):
    """fn() in a fresh thread (grad mode on there, as in any server worker); returns its result."""
    out = {}

    def target():
        out["grad_on_here"] = paddle.is_grad_enabled()
        try:
            out["value"] = fn()
        except BaseException as err:  # re-raised in the test's thread
            out["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(120)
    if "error" in out:
        raise out["error"]
    assert out["grad_on_here"], "a fresh thread starts with grad mode on (Paddle's default)"
    return out["value"]


def test_the_engine_run_from_a_fresh_worker_thread_produces_no_tensor_that_requires_grad(tiny_dir):
    engine = in_new_thread(lambda: Engine(str(tiny_dir), dtype="float32").load())  # loaded in one thread ...
    final = in_new_thread(lambda: engine.generate(video_chat(2, seed=40), GREEDY))  # ... asked from another
    assert final.stats.generated_tokens >= 1
    produced = list(engine.features._items.values())
    for _, _, kv, _ in engine.prefixes._entries:
        produced += kv.keys + kv.values
    assert produced and all(t.stop_gradient for t in produced)
    assert all(p.stop_gradient for p in engine.model.parameters())
    assert engine.run(paddle.is_grad_enabled) is False  # the thread that computes
    if parallel._pool is not None:  # the CPU share workers compute too
        assert parallel._pool.submit(paddle.is_grad_enabled).result() is False
    # even model code called directly from a thread with grad on records nothing: the parameters cannot require it
    embeds = in_new_thread(lambda: engine.model.embed_prompt([1, 2, 3], []))
    assert embeds.stop_gradient


def test_compute_thread_runs_everything_in_one_thread_and_passes_errors_back():
    compute = ComputeThread()
    names = {compute.run(lambda: threading.current_thread().name) for _ in range(3)}
    names |= set(in_new_thread(lambda: [compute.run(lambda: threading.current_thread().name)]))
    assert len(names) == 1 and names.pop().startswith("llava-compute")
    assert compute.run(lambda: compute.run(lambda: 7)) == 7  # a call from the compute thread runs in place
    with pytest.raises(ZeroDivisionError):
        compute.run(lambda: 1 / 0)


def test_a_new_chats_steps_run_several_in_a_row_between_the_decoding_chats_steps(monkeypatch):
    """While chats decode, a newcomer's prefill chunks (each sent once the last returned) run back to back up to
    OTHER_SLICE_S, then one batched decode step: the newcomer is not held back a decode step per chunk, and the
    decoding chats still advance between slices."""
    from llava_ui.engine import scheduler as scheduling
    monkeypatch.setattr(scheduling, "OTHER_SLICE_S", 0.25)
    ran, done = [], threading.Event()

    class Model:
        def decode_batch(self, tokens, caches, positions):
            ran.append("decode")
            time.sleep(0.01)
            return [0] * len(tokens), caches

    compute, model = ComputeThread(), Model()

    def decoder():
        with compute.decoding():
            while not done.is_set():
                compute.decode(model, 1, None, 0)

    def chunk():
        ran.append("chunk")
        time.sleep(0.06)

    threads = [threading.Thread(target=decoder) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    for _ in range(12):
        compute.run(chunk)
    done.set()
    for thread in threads:
        thread.join()
    first, last = ran.index("chunk"), len(ran) - ran[::-1].index("chunk")
    runs = [len(run) for run in "".join("c" if step == "chunk" else "d" for step in ran[first:last]).split("d")
            if run]
    assert sum(runs) == 12 and len(runs) >= 3  # the decoding chats stepped between slices ...
    assert all(3 <= run <= 5 for run in runs[:-1])  # ... of ~0.25 s each (0.06 s a chunk), not one chunk each


def test_progress_comes_before_the_first_token_image_by_image_then_chunk_by_chunk(engine, monkeypatch):
    monkeypatch.setattr(language, "PREFILL_CHUNK", 64)
    slow = Rates(engine.rates.workload, 1e6)  # a slow machine's rates (kept as they are): the time left is large
    monkeypatch.setattr(slow, "record", lambda *args: None)
    monkeypatch.setattr(engine, "rates", slow)
    events = list(engine.stream(video_chat(3, seed=10), GREEDY))
    first_delta = next((i for i, e in enumerate(events) if isinstance(e, Delta)), len(events) - 1)
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress and all(events.index(e) < first_delta for e in progress)
    vision = [(e.done, e.total) for e in progress if e.stage == "vision"]
    assert vision == [(0, 3), (1, 3), (2, 3), (3, 3)]
    prefill = [(e.done, e.total) for e in progress if e.stage == "prefill"]
    total = events[-1].stats.prompt_tokens
    assert [d for d, _ in prefill] == list(range(64, total, 64)) and {t for _, t in prefill} == {total}
    etas = [e.eta_s for e in progress]
    assert all(isinstance(eta, float) and eta >= 0 for eta in etas)
    assert etas[-1] < etas[0]  # the time left shrinks as the work is done
    # the same images again: no vision step, so no vision progress
    again = list(engine.stream(video_chat(3, seed=10, text="And then?"), GREEDY))
    assert not [e for e in again if isinstance(e, Progress) and e.stage == "vision"]


def test_a_stop_during_vision_ends_it_after_the_current_view(engine):
    """A lone image in `trained` mode is several anyres views: a stop lands between two of them."""
    conversation = Conversation()
    conversation.add_user("What is this?", [picture(77, size=(800, 400))])
    stop = threading.Event()
    views = engine.plan(conversation).images[0].views
    before = engine.model.vision_calls
    events = []
    for event in engine.stream(conversation, GREEDY, stop_event=stop):
        events.append(event)
        if isinstance(event, Progress) and event.stage == "vision" and len(events) == 2:
            stop.set()  # after the first view (the first event comes before any)
    assert views > 2 and engine.model.vision_calls - before == 1  # the first view only
    assert events[-1].finish_reason == "stopped" and events[-1].stats.generated_tokens == 0
    assert conversation.turns[-1].answer == ""


def test_the_rates_learn_from_what_ran_and_bound_the_default_frames(engine):
    workload = Workload.of(engine.config)
    assert workload.vision_view > 0 and workload.prefill(100, 10) > workload.prefill(0, 10)
    slow, fast = Rates(workload, 1e6), Rates(workload, 1e15)
    assert slow.frames_within() == 1 and fast.frames_within() == 16
    rates = Rates(workload, 1e9)
    rates.record("vision", 1e9, 2.0)  # measured: half the prior
    assert rates.rate["vision"] == pytest.approx(5e8)
    assert rates.seconds(views=2) == pytest.approx(2 * workload.vision_view / 5e8)
    engine.generate(video_chat(1, seed=900), GREEDY)
    assert engine.rates.measured["vision"] > 0 and engine.rates.measured["prefill"] > 0
    assert 1 <= engine.default_frames() <= 16
    assert human_seconds(12.4) == "12 s" and human_seconds(170) == "about 3 min"


@pytest.fixture(scope="module")
def api_root(engine):
    with serve_api(engine) as url:
        yield url


def test_the_api_streams_progress_as_sse_comments_that_openai_clients_skip(api_root):
    frames = [picture(100 + i) for i in range(3)]
    content = [{"type": "text", "text": "What changed?"}] + [
        {"type": "image_url", "image_url": {"url": data_url(f)}} for f in frames]
    request = {"messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", api_root + "/chat/completions", json=request, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    comments = [json.loads(line[len(": progress "):]) for line in lines if line.startswith(": progress ")]
    assert [(c["stage"], c["done"], c["total"]) for c in comments if c["stage"] == "vision"][:2] == [
        ("vision", 0, 3), ("vision", 1, 3)]
    assert set(comments[0]) == {"stage", "done", "total", "eta_s"}
    data = [i for i, line in enumerate(lines) if line.startswith("data:")]
    first_text = data[1]  # after the role chunk: the first piece of the answer (or its finish)
    assert all(lines.index(": progress " + json.dumps(c)) < first_text for c in comments)
    # the official client reads the same kind of stream as if the comments were not there
    client = openai.OpenAI(base_url=api_root, api_key="none")
    content[1:] = [{"type": "image_url", "image_url": {"url": data_url(picture(200 + i))}} for i in range(3)]
    stream = client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}],
                                            max_tokens=3, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_remote_front_end_shows_the_progress_of_this_app(api_root):
    remote = RemoteEngine(api_root)
    conversation = Conversation()
    conversation.add_user("Compare <image> with <image>.", [picture(300), picture(301)])
    events = list(remote.stream(conversation, GREEDY))
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress and progress[0].stage == "vision" and progress[0].total == 2
    assert isinstance(events[-1], Result)


def test_the_chat_shows_progress_in_place_of_the_answer(engine):
    chat = ChatHandlers(engine, frames=3)
    session = ChatSession()
    session.conversation.add_user("What happens?", [], clip(3, seed=500))
    from llava_ui.web.session import TurnRecord

    session.conversation.turns[-1].shown = TurnRecord([])
    bubbles = []
    for update in chat.respond(session, "", 0, 1.0, 0, 1.0, 3, "0", ""):
        messages = update[0]
        if isinstance(messages, list) and messages and messages[-1]["role"] == "assistant":
            bubbles.append(messages[-1]["content"])
    shown = [b for b in bubbles if "encoding frame" in b]
    assert shown and shown[0].startswith("*encoding frame 1 of 3")
    assert session.conversation.turns[-1].answer is not None and not session.busy


def test_before_sending_the_chat_says_when_media_will_take_long(engine, tmp_path, monkeypatch):
    chat = ChatHandlers(engine)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not decoded for the estimate")
    image = tmp_path / "a.png"
    picture(1).save(image)
    assert chat.estimate({"text": "hi", "files": []}) == ""
    monkeypatch.setattr(engine, "rates", Rates(engine.rates.workload, 1e6))  # a very slow machine
    hint = chat.estimate({"text": "hi", "files": [str(video)]}, 16)
    assert hint.startswith("16 frames ≈ ") and "tokens ≈ about" in hint and "fewer frames answer faster" in hint
    assert chat.estimate({"text": "hi", "files": [str(image)]}).startswith("1 image ≈ ")
    monkeypatch.setattr(engine, "rates", Rates(engine.rates.workload, 1e15))  # fast: nothing to say
    assert chat.estimate({"text": "hi", "files": [str(video)]}, 16) == ""


def test_the_frames_setting_shows_the_default_in_use_and_why(engine, monkeypatch):
    workload = engine.rates.workload
    # a machine on which 5 frames take about a minute
    monkeypatch.setattr(engine, "rates", Rates(workload, Rates(workload, 1.0).seconds(views=5, positions=5 * 730) / 55))
    update = ChatHandlers(engine).frames_setting()
    assert update["value"] == engine.rates.frames_within() < 16
    assert f"{update['value']}: the first token within about a minute" in update["info"]
    assert ChatHandlers(engine, frames=5).frames_setting()["value"] == 5


def test_a_closed_tab_stops_its_answer(engine):
    chat = ChatHandlers(engine)

    class Request:
        session_hash = "tab-1"

    session = ChatSession()
    chat._register(session, Request())
    chat.leave(Request())
    assert session.stop.is_set() and "tab-1" not in chat.live
    chat.leave(None)  # an unknown tab: nothing to stop


def test_the_command_line_draws_progress_bars_on_stderr(tiny_dir, tmp_path, capsys):
    import shutil

    from llava_ui.commands.main import main

    fresh = shutil.copytree(tiny_dir, tmp_path / "model")  # a model (and caches) of its own: it loads, it encodes
    code = main(["generate", "--model", str(fresh), "--video", "assets/ball_red_to_blue.mp4", "--frames", "3",
                 "--prompt", "What happens?", "--max-new-tokens", "2", "--temperature", "0"])
    err = capsys.readouterr().err
    assert code == 0
    assert "loading the weights" in err and "encoding frames" in err and "3/3" in err


def test_the_command_line_picks_the_frame_count_from_this_machine_without_frames(tiny_dir, capsys):
    from llava_ui.commands.main import main

    code = main(["generate", "--model", str(tiny_dir), "--video", "assets/ball_red_to_blue.mp4",
                 "--prompt", "What happens?", "--max-new-tokens", "1", "--temperature", "0", "--json"])
    captured = capsys.readouterr()
    record = json.loads(captured.out.splitlines()[-1])
    assert code == 0 and "the default here" in captured.err
    assert 1 <= len(record["frames"]) <= 16


def counting_stop(after: int):
    """should_stop that turns true on its `after`-th question; .asked counts the questions."""
    def should_stop():
        should_stop.asked += 1
        return should_stop.asked >= after
    should_stop.asked = 0
    return should_stop


def test_a_stop_lands_between_two_layers_of_a_vision_view_and_of_a_prefill_chunk(engine):
    from llava_ui.errors import Stopped
    from llava_ui.model.processing import preprocess

    layers = engine.config.vision.num_hidden_layers
    should_stop = counting_stop(2)
    with pytest.raises(Stopped):
        engine.run(engine.model.encode_views, preprocess(picture(5), 384)[None], should_stop)
    assert should_stop.asked == 2 <= layers  # asked before each layer: the view ended after its first
    embeds = engine.run(engine.model.embed_prompt, list(range(1, 40)), [])
    should_stop = counting_stop(2)
    with pytest.raises(Stopped):
        engine.run(engine.model.forward_hidden, embeds, None, 0, should_stop)
    assert should_stop.asked == 2 <= engine.config.text["num_hidden_layers"]


def test_a_stop_inside_a_view_ends_the_request_without_finishing_the_view(engine):
    conversation = video_chat(2, seed=2000)
    stop = threading.Event()
    calls = engine.model.vision_calls
    original = engine.model.encode_views

    def encode_then_stop(pixels, should_stop=None):  # the stop arrives while the first view is being encoded
        stop.set()
        return original(pixels, should_stop)

    engine.model.encode_views = encode_then_stop
    try:
        final = engine.generate(conversation, GREEDY, stop_event=stop)
    finally:
        del engine.model.encode_views
    assert final.finish_reason == "stopped" and final.stats.generated_tokens == 0
    assert engine.model.vision_calls == calls + 1 and final.stats.images_encoded == 0

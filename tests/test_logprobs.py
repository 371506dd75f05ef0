"""Token probabilities (issue 36, part 1): each generated token's raw log-probability and its K likeliest
alternatives equal transformers' log-softmax of its logits, through the command line, the engine and /v1 with the
official openai client (streamed and not); nothing is computed when nothing is asked."""
import json

import numpy as np
import openai
import pytest
from fastapi import FastAPI
from PIL import Image
from servers import RecordingEngine, serve

from llava_ui.backends.base import Result
from llava_ui.chat.conversation import Conversation
from llava_ui.chat.prompt import IMAGE_MARKER
from llava_ui.commands.main import main
from llava_ui.config import GenerationSettings
from llava_ui.engine import steps as generate_module
from llava_ui.model.processing import preprocess
from llava_ui.openai.server import create_api_router

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE = "assets/shapes_before.png"
QUESTION = "What shapes do you see?"
STEPS, K, TOLERANCE = 8, 3, 1e-4


@pytest.fixture(scope="module")
def engine(hf_engine):
    return hf_engine


@pytest.fixture(scope="module")
def reference(hf_dir):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    return model.eval()


def reference_logprobs(reference, engine, generated: list[int]) -> np.ndarray:
    """transformers' log-softmax at every position that produced a generated token (teacher-forced), float64."""
    conversation = Conversation()
    conversation.add_user_files(QUESTION, [IMAGE])
    plan = engine.plan(conversation, "flat")
    image_token = engine.config.image_token_index
    ids = []
    for t in plan.prompt_ids:
        ids.extend([image_token] * plan.images[0].tokens if t == IMAGE_MARKER else [t])
    pixels = torch.from_numpy(np.stack([preprocess(Image.open(IMAGE))]))
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([ids + generated]), pixel_values=pixels).logits[0]
    steps = logits[len(ids) - 1:len(ids) - 1 + len(generated)].double()
    return torch.log_softmax(steps, dim=-1).numpy()


def assert_matches(records, token_ids, expected: np.ndarray, tokenizer=None):
    """records: (token_id, logprob, [(id, logprob) of the alternatives]) per token."""
    assert len(records) == len(token_ids) == len(expected)
    for (token_id, logprob, top), wanted, row in zip(records, token_ids, expected):
        assert token_id in (wanted, None)
        assert wanted == int(row.argmax())  # greedy: the reference's likeliest token
        assert abs(logprob - row[wanted]) <= TOLERANCE
        assert len(top) == K
        best = np.sort(row)[::-1][:K]
        assert np.abs(np.array([lp for _, lp in top]) - best).max() <= TOLERANCE  # best first, the same values
        for alt_id, alt_logprob in top:
            if alt_id is not None:
                assert abs(alt_logprob - row[alt_id]) <= TOLERANCE


def test_command_line_logprobs_equal_transformers(engine, reference, hf_dir, capsys):
    code = main(["generate", "--model", str(hf_dir), "--dtype", "float32", "--image-mode", "flat", "--image", IMAGE,
                 "--prompt", QUESTION, "--max-new-tokens", str(STEPS), "--temperature", "0", "--json",
                 "--logprobs", str(K)])
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 0
    entries = record["logprobs"]
    assert all(set(e) == {"token_id", "token", "logprob", "top"} for e in entries)
    assert all(set(alt) == {"token_id", "token", "logprob"} for e in entries for alt in e["top"])
    assert [e["top"][0]["token_id"] for e in entries] == [e["token_id"] for e in entries]  # greedy: the best
    for e in entries:
        raw = engine.tokenizer.token_bytes(e["token_id"])
        assert e["token"] == raw.decode("utf-8", errors="replace")
    expected = reference_logprobs(reference, engine, record["token_ids"])
    assert_matches([(e["token_id"], e["logprob"], [(a["token_id"], a["logprob"]) for a in e["top"]])
                    for e in entries], record["token_ids"], expected)


def test_command_line_without_logprobs_has_no_field(hf_dir, capsys):
    main(["generate", "--model", str(hf_dir), "--dtype", "float32", "--image-mode", "flat", "--prompt", "Hi",
          "--max-new-tokens", "3", "--temperature", "0", "--json"])
    assert "logprobs" not in json.loads(capsys.readouterr().out.splitlines()[-1])


def test_logprobs_are_raw_whatever_the_sampling_settings(engine, reference):
    """Temperature, top-k/top-p and repetition penalty change which token is picked, not the reported numbers."""
    conversation = Conversation()
    conversation.add_user_files(QUESTION, [IMAGE])
    final = engine.generate(conversation, GenerationSettings(max_new_tokens=5, temperature=1.5, top_k=40, top_p=0.9,
                                                             repetition_penalty=1.3, seed=4, logprobs=K),
                            image_mode="flat")
    expected = reference_logprobs(reference, engine, final.token_ids)
    for record, token, row in zip(final.logprobs, final.token_ids, expected):
        assert record.token_id == token and abs(record.logprob - row[token]) <= TOLERANCE
        assert np.abs(np.array([a.logprob for a in record.top]) - np.sort(row)[::-1][:K]).max() <= TOLERANCE
    assert len(final.logprobs) == len(final.token_ids)


def test_nothing_is_computed_when_nothing_is_asked(engine, monkeypatch):
    def refuse(*args):
        raise AssertionError("token probabilities computed without being asked for")

    monkeypatch.setattr(generate_module, "step_scores", refuse)
    conversation = Conversation()
    conversation.add_user_files(QUESTION, [IMAGE])
    events = list(engine.stream(conversation, GenerationSettings(max_new_tokens=4, temperature=0), "flat"))
    final = events[-1]
    assert isinstance(final, Result) and final.logprobs is None and len(final.token_ids) == 4
    assert all(getattr(e, "logprobs", None) is None for e in events)


@pytest.fixture(scope="module")
def client(engine):
    app = FastAPI()
    app.include_router(create_api_router(engine))
    with serve(app) as root:
        yield openai.OpenAI(base_url=root + "/v1", api_key="unused", max_retries=0)


def image_message() -> dict:
    import base64
    import io

    buffer = io.BytesIO()
    Image.open(IMAGE).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": QUESTION}]}


def openai_records(content) -> list:
    return [(None, c.logprob, [(None, a.logprob) for a in c.top_logprobs]) for c in content]


def assert_bytes_filled(content) -> None:
    for item in [*content, *(a for c in content for a in c.top_logprobs)]:
        assert isinstance(item.bytes, list) and item.bytes
        assert item.token == bytes(item.bytes).decode("utf-8", errors="replace")


def test_api_logprobs_equal_transformers(client, engine, reference):
    reply = client.chat.completions.create(model="", messages=[image_message()], max_tokens=STEPS, temperature=0,
                                           logprobs=True, top_logprobs=K)
    content = reply.choices[0].logprobs.content
    token_ids = engine.finals[-1].token_ids
    assert len(content) == reply.usage.completion_tokens == len(token_ids)
    assert_bytes_filled(content)
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", errors="replace") == \
        reply.choices[0].message.content
    assert_matches(openai_records(content), token_ids, reference_logprobs(reference, engine, token_ids))


def test_api_streamed_logprobs_cover_each_delta(client, engine, reference):
    chunks = list(client.chat.completions.create(model="", messages=[image_message()], max_tokens=STEPS,
                                                 temperature=0, logprobs=True, top_logprobs=K, stream=True))
    content = []
    for chunk in chunks:
        choice = chunk.choices[0] if chunk.choices else None
        if choice is None or choice.logprobs is None:
            continue
        pieces = choice.logprobs.content
        # the tokens of exactly this delta: their bytes are its text
        assert b"".join(bytes(c.bytes) for c in pieces).decode("utf-8", errors="replace") == choice.delta.content
        content += pieces
    token_ids = engine.finals[-1].token_ids
    assert len(content) == len(token_ids) == STEPS
    assert_bytes_filled(content)
    assert_matches(openai_records(content), token_ids, reference_logprobs(reference, engine, token_ids))


def test_api_without_logprobs_answers_none(client, engine):
    reply = client.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           temperature=0)
    assert reply.choices[0].logprobs is None and engine.finals[-1].logprobs is None
    chunks = list(client.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=3, temperature=0, stream=True))
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)


def test_api_top_logprobs_alone_gives_only_the_token(client):
    reply = client.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           temperature=0, logprobs=True)
    assert len(reply.choices[0].logprobs.content) == 3
    assert all(c.top_logprobs == [] for c in reply.choices[0].logprobs.content)


@pytest.mark.parametrize("extra,param", [
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(logprobs=False, top_logprobs=2), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=-1), "top_logprobs"),
])
def test_api_refuses_top_logprobs_without_logprobs_or_out_of_range(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       **extra)
    assert caught.value.body["param"] == param


def test_inspector_shades_each_token_and_export_replays_the_probabilities(engine, hf_dir, capsys, tmp_path):
    import re

    from llava_ui.commands.main import main as cli
    from llava_ui.web.handlers import ALTERNATIVES, ChatHandlers

    chat = ChatHandlers(engine, frames=2)
    _, _, session = chat.send({"text": QUESTION, "files": [IMAGE]}, None, 2)
    updates = list(chat.respond(session, "", 0, 1.0, 0, 1.0, STEPS, 1, "flat", True))
    probabilities = updates[-1][7]
    record = session.turns[0].record
    assert probabilities["visible"] and len(record.logprobs) == len(record.token_ids) == STEPS
    tokens = re.findall(r'<span class="token" style="background: rgba\(220, 38, 38, ([0-9.]+)\)" '
                        r'title="([^"]*)">', probabilities["value"])
    assert len(tokens) == STEPS
    for (alpha, title), token in zip(tokens, record.logprobs):
        chance = np.exp(token.logprob)
        assert abs(float(alpha) - 0.75 * (1 - chance)) <= 0.01  # the less sure, the redder
        assert title.count("%") == 1 + ALTERNATIVES  # the token's probability, then its alternatives'
        assert f"{100 * chance:.1f} %" in title

    path = chat.export(session)["value"]
    export = json.loads(open(path).read())
    assert export["turns"][0]["settings"]["logprobs"] == ALTERNATIVES
    assert len(export["turns"][0]["output"]["logprobs"]) == STEPS
    export["model"] = str(hf_dir)
    replayed = tmp_path / "export.json"
    replayed.write_text(json.dumps(export))
    capsys.readouterr()
    assert cli(["replay", str(replayed)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("token probabilities"))
    assert f"{STEPS} tokens compared" in line and float(line.rsplit(" ", 1)[1]) <= 1e-5


def test_a_token_holding_part_of_a_character_keeps_its_bytes(engine):
    from llava_ui.backends.base import token_logprob
    from llava_ui.model.logprobs import StepScores
    from llava_ui.openai.format import logprobs_field

    text = "llama 🦙"
    ids = engine.tokenizer.encode_text(text)
    pieces = [engine.tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    records = [token_logprob(StepScores(i, -0.5, [i], [-0.5]), engine.tokenizer.token_bytes) for i in ids]
    split = [r for r in records if "\ufffd" in r.token]
    assert split, "the emoji's four bytes span several tokens"
    content = logprobs_field(records)["content"]
    assert b"".join(bytes(c["bytes"]) for c in content) == text.encode()
    assert all(c["token"] == bytes(c["bytes"]).decode("utf-8", errors="replace") for c in content)
    assert [c["top_logprobs"][0]["bytes"] for c in content] == [c["bytes"] for c in content]


def test_remote_engine_passes_the_request_through(client, engine):
    from llava_ui.backends.remote import RemoteEngine

    remote = RemoteEngine(str(client.base_url).rstrip("/"))
    conversation = Conversation()
    conversation.add_user("Hi there", [])
    final = remote.generate(conversation, GenerationSettings(max_new_tokens=5, temperature=0, logprobs=2))
    local = engine.finals[-1]
    assert [(r.token, r.logprob, [a.logprob for a in r.top]) for r in final.logprobs] == \
        [(r.token, r.logprob, [a.logprob for a in r.top]) for r in local.logprobs]
    assert all(r.token_id is None for r in final.logprobs)  # OpenAI's format carries no ids
    conversation.turns[-1].answer = None  # ask again
    plain = remote.generate(conversation, GenerationSettings(max_new_tokens=2, temperature=0))
    assert plain.logprobs is None and engine.finals[-1].logprobs is None

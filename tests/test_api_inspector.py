"""The inspector's extras through /v1 with the official openai client (issue 36): the extra request fields
`attention` and `image_effect` put each token's attention over the images and the images' effect on its
log-probability into the reply's `llava_ui` details, streamed (on the last chunk) and not, equal to transformers'
eager attention rows and its with-minus-without log-softmax; absent unless asked."""
import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image
from servers import serve_api
from test_attention import IMAGES, reference_rows
from test_image_effect import reference_logprobs

from llava_ui.chat.prompt import IMAGE_MARKER
from llava_ui.model.image_effect import without_images
from llava_ui.model.processing import preprocess
from llava_ui.openai.format import ChatMessage, conversation_from_messages

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STEPS = 5
LOOKING = {"attention": True, "image_effect": True}


@pytest.fixture(scope="module")
def engine(hf_engine):
    return hf_engine


@pytest.fixture(scope="module")
def client(engine):
    with serve_api(engine) as base_url:
        yield openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def messages() -> list[dict]:
    parts = []
    for path in IMAGES:
        buffer = io.BytesIO()
        Image.open(path).save(buffer, format="PNG")
        parts.append({"type": "image_url",
                      "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}})
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What changed?"}]}]


def assert_equals_transformers(details: dict, engine, hf_dir) -> None:
    generated = engine.finals[-1].token_ids
    attention, effect = details["attention"], details["image_effect"]
    assert len(attention) == len(effect) == len(generated) == STEPS
    conversation = conversation_from_messages([ChatMessage(**m) for m in messages()])
    plan = engine.plan(conversation, "flat")
    image_token = engine.config.image_token_index
    rows, ids = reference_rows(hf_dir, plan.prompt_ids, image_token, generated)
    spans = [[i for i, t in enumerate(ids) if t == image_token][k * 729:(k + 1) * 729] for k in range(2)]
    for token, per_layer in enumerate(attention):
        for layer, per_image in enumerate(per_layer):
            for image, weights in enumerate(per_image):
                np.testing.assert_allclose(weights, rows[layer][token, spans[image]], rtol=1e-4, atol=1e-7)
    with_ids = [t for marker in plan.prompt_ids for t in ([image_token] * 729 if marker == IMAGE_MARKER else [marker])]
    pixels = torch.from_numpy(np.stack([preprocess(Image.open(path)) for path in IMAGES]))
    expected = (reference_logprobs(hf_dir, with_ids, generated, pixels)
                - reference_logprobs(hf_dir, without_images(plan.prompt_ids), generated))
    np.testing.assert_allclose(effect, expected, atol=2e-4, rtol=0)


def test_api_attention_and_image_effect_equal_transformers(client, engine, hf_dir):
    reply = client.chat.completions.create(model="", messages=messages(), max_tokens=STEPS, temperature=0,
                                           extra_body=LOOKING)
    assert_equals_transformers(reply.model_extra["llava_ui"], engine, hf_dir)


def test_api_streamed_reply_carries_them_on_its_last_chunk(client, engine, hf_dir):
    chunks = list(client.chat.completions.create(model="", messages=messages(), max_tokens=STEPS, temperature=0,
                                                 stream=True, extra_body=LOOKING))
    carrying = [c.model_extra["llava_ui"] for c in chunks if (c.model_extra or {}).get("llava_ui")]
    assert len(carrying) == 1
    assert_equals_transformers(carrying[0], engine, hf_dir)


def test_api_answers_without_them_unless_asked(client):
    reply = client.chat.completions.create(model="", messages=messages(), max_tokens=2, temperature=0)
    details = reply.model_extra["llava_ui"]
    assert "attention" not in details and "image_effect" not in details

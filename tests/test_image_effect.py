"""What the images changed (issue 36, part 3): each generated token's log-probability with the images minus without
them equals transformers' teacher-forced log-softmax with the images minus its log-softmax for the same prompt text
with the image placeholders taken out; nothing is computed unless asked."""
import json

import numpy as np
import pytest
from PIL import Image

from llava_ui.chat.conversation import Conversation
from llava_ui.chat.prompt import IMAGE_MARKER, IMAGE_TOKEN
from llava_ui.commands.main import main
from llava_ui.model.image_effect import without_images
from llava_ui.model.processing import preprocess

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGES = ["assets/shapes_before.png", "assets/shapes_after.png"]
QUESTION = "What changed between <image> and <image>?"
STEPS, TOLERANCE = 6, 2e-4  # two log-probabilities, each within the 1e-4 of test_logprobs


@pytest.fixture(scope="module")
def engine(hf_dir):
    from llava_ui.engine import get_engine

    return get_engine(str(hf_dir), hub=None, device=None, dtype="float32", image_mode="flat", context_length=None, batch_slots=1)


def generate_json(hf_dir, capsys, *extra) -> dict:
    code = main(["generate", "--model", str(hf_dir), "--dtype", "float32", "--image-mode", "flat",
                 "--max-new-tokens", str(STEPS), "--temperature", "0", "--json", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def reference_logprobs(hf_dir, ids: list[int], generated: list[int], pixels=None) -> np.ndarray:
    """transformers' log-probability of each generated token, teacher-forced after `ids` (float64)."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([ids + generated]), pixel_values=pixels).logits[0]
    steps = torch.log_softmax(logits[len(ids) - 1:len(ids) - 1 + len(generated)].double(), dim=-1).numpy()
    return steps[np.arange(len(generated)), generated]


def test_command_line_image_effect_equals_transformers_with_minus_without(hf_dir, engine, capsys):
    record = generate_json(hf_dir, capsys, "--image", IMAGES[0], "--image", IMAGES[1], "--prompt", QUESTION,
                           "--image-effect")
    effect, generated = record["image_effect"], record["token_ids"]
    assert len(effect) == len(generated) == STEPS
    conversation = Conversation()
    conversation.add_user_files(QUESTION, IMAGES)
    plan = engine.plan(conversation, "flat")
    image_token = engine.config.image_token_index
    with_ids = []
    for t in plan.prompt_ids:
        with_ids.extend([image_token] * 729 if t == IMAGE_MARKER else [t])
    pixels = torch.from_numpy(np.stack([preprocess(Image.open(path)) for path in IMAGES]))
    seen = reference_logprobs(hf_dir, with_ids, generated, pixels)
    blind = reference_logprobs(hf_dir, without_images(plan.prompt_ids), generated)
    np.testing.assert_allclose(effect, seen - blind, atol=TOLERANCE, rtol=0)
    assert np.abs(seen - blind).max() > 10 * TOLERANCE  # the images do change this model's answer


def test_without_images_the_prompt_keeps_its_text(engine):
    conversation = Conversation()
    conversation.add_user_files(QUESTION, IMAGES)
    plan = engine.plan(conversation, "flat")
    text = b"".join(engine.tokenizer.token_bytes(t) for t in without_images(plan.prompt_ids)).decode()
    assert IMAGE_TOKEN not in text and text == plan.prompt.replace(IMAGE_TOKEN, "")


def test_a_prompt_without_images_changes_nothing(hf_dir, capsys):
    record = generate_json(hf_dir, capsys, "--prompt", "Hi there", "--image-effect")
    assert len(record["image_effect"]) == len(record["token_ids"]) > 0
    assert np.abs(record["image_effect"]).max() <= 1e-4  # decode's own log-probabilities against the prefill's


def test_image_effect_is_absent_unless_asked(hf_dir, capsys):
    record = generate_json(hf_dir, capsys, "--image", IMAGES[0], "--prompt", "Hi")
    assert "image_effect" not in record


def test_a_remote_engine_refuses_the_image_effect():
    from llava_ui.backends.remote import RemoteEngine
    from llava_ui.config import GenerationSettings
    from llava_ui.errors import UserError

    conversation = Conversation()
    conversation.add_user("Hi", [])
    with pytest.raises(UserError, match="local engine"):
        RemoteEngine("http://127.0.0.1:9/v1").generate(conversation, GenerationSettings(image_effect=True))

"""Where the model looked (issue 36, part 2): each generated token's attention over every image's visual positions,
per layer and averaged over heads, equals transformers' eager `output_attentions` rows for the same tokens."""
import json

import numpy as np
import pytest
from PIL import Image

from llava_ui.chat.conversation import Conversation
from llava_ui.chat.prompt import IMAGE_MARKER
from llava_ui.commands.main import main
from llava_ui.model import attention_rows
from llava_ui.model.processing import preprocess

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGES = ["assets/shapes_before.png", "assets/shapes_after.png"]
QUESTION = "What changed between <image> and <image>?"
STEPS = 6


def reference_rows(hf_dir, prompt_ids: list[int], image_token: int, generated: list[int]) -> list:
    """transformers' (eager) head-mean attention rows of the queries that produced `generated`, per layer:
    [layers] of [tokens, keys]."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        str(hf_dir), torch_dtype=torch.float32, attn_implementation="eager").eval()
    ids = []
    for t in prompt_ids:
        ids.extend([image_token] * 729 if t == IMAGE_MARKER else [t])
    pixels = torch.from_numpy(np.stack([preprocess(Image.open(path)) for path in IMAGES]))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids + generated[:-1]]), pixel_values=pixels, output_attentions=True)
    first = len(ids) - 1
    return [layer[0].mean(dim=0)[first:first + len(generated)].numpy() for layer in out.attentions], ids


def test_command_line_attention_equals_transformers_eager_rows(hf_dir, capsys, monkeypatch):
    monkeypatch.setattr(attention_rows, "ROWS", 4)  # the producing queries go through in two chunks
    code = main(["generate", "--model", str(hf_dir), "--dtype", "float32", "--image-mode", "flat",
                 "--image", IMAGES[0], "--image", IMAGES[1], "--prompt", QUESTION, "--max-new-tokens", str(STEPS),
                 "--temperature", "0", "--json", "--attention"])
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 0
    attention, generated = record["attention"], record["token_ids"]
    assert len(attention) == len(generated) == STEPS
    from llava_ui.engine import get_engine

    engine = get_engine(str(hf_dir), hub=None, device=None, dtype="float32", image_mode="flat", context_length=None, batch_slots=1)
    conversation = Conversation()
    conversation.add_user_files(QUESTION, IMAGES)
    plan = engine.plan(conversation, "flat")
    rows, ids = reference_rows(hf_dir, plan.prompt_ids, engine.config.image_token_index, generated)
    spans = [[i for i, t in enumerate(ids) if t == engine.config.image_token_index][k * 729:(k + 1) * 729]
             for k in range(2)]
    assert [len(images) for token in attention for images in token] == [2] * (STEPS * len(rows))
    for token, per_layer in enumerate(attention):
        assert len(per_layer) == len(rows)  # every layer
        for layer, per_image in enumerate(per_layer):
            for image, weights in enumerate(per_image):
                assert len(weights) == record["visual_tokens_per_image"][image] == 729
                expected = rows[layer][token, spans[image]]
                np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-7)
    shares = np.array([[sum(w) for w in per_image] for per_layer in attention for per_image in per_layer])
    assert (shares > 0).all() and (shares.sum(axis=1) <= 1 + 1e-5).all()  # a share of all the attention


def test_attention_is_absent_unless_asked(hf_dir, capsys):
    main(["generate", "--model", str(hf_dir), "--dtype", "float32", "--image-mode", "flat", "--image", IMAGES[0],
          "--prompt", "Hi", "--max-new-tokens", "2", "--temperature", "0", "--json"])
    assert "attention" not in json.loads(capsys.readouterr().out.splitlines()[-1])


def test_text_only_prompt_gives_one_empty_list_per_layer(hf_dir, capsys):
    main(["generate", "--model", str(hf_dir), "--dtype", "float32", "--prompt", "Hi", "--max-new-tokens", "3",
          "--temperature", "0", "--json", "--attention"])
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["attention"] == [[[], []]] * len(record["token_ids"])  # the tiny model has two layers


def test_a_remote_engine_refuses_attention():
    from llava_ui.backends.remote import RemoteEngine
    from llava_ui.config import GenerationSettings
    from llava_ui.errors import UserError

    conversation = Conversation()
    conversation.add_user("Hi", [])
    with pytest.raises(UserError, match="local engine"):
        RemoteEngine("http://127.0.0.1:9/v1").generate(conversation, GenerationSettings(attention=True))


def test_attention_that_could_exhaust_memory_is_refused_before_any_compute(tiny_dir, monkeypatch):
    """Tokens x layers x visual positions beyond the bound: a message naming the token count that fits, the model
    not run; within the bound the answer carries its attention."""
    from llava_ui.engine import engine as local, plan as planning
    from llava_ui.backends.base import Result
    from llava_ui.chat.conversation import Conversation
    from llava_ui.config import GenerationSettings
    from llava_ui.errors import UserError
    from PIL import Image

    engine = local.Engine(str(tiny_dir), dtype="float32").load()
    conversation = Conversation()
    conversation.add_user("What is in <image>?", [Image.new("RGB", (64, 48), (200, 30, 30))])
    plan = engine.plan(conversation, max_new_tokens=4)
    layers = engine.config.text["num_hidden_layers"]
    monkeypatch.setattr(planning, "ATTENTION_VALUES", 4 * layers * plan.visual_tokens)
    calls = engine.model.vision_calls
    with pytest.raises(UserError, match="at most 4 new tokens"):
        list(engine.stream(conversation, GenerationSettings(max_new_tokens=5, temperature=0, attention=True)))
    assert engine.model.vision_calls == calls
    final = [e for e in engine.stream(conversation, GenerationSettings(max_new_tokens=4, temperature=0,
                                                                         attention=True)) if isinstance(e, Result)]
    assert final and len(final[0].attention) == final[0].stats.generated_tokens

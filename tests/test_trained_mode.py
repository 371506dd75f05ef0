"""The `trained` image behaviour: a lone image is packed as LLaVA-NeXT's anyres (proven equal to transformers'
LlavaNextForConditionalGeneration on the same weights and pixels), several images or video frames are padded to
squares; the behaviour is a setting with a per-checkpoint default, and the context budget counts its real tokens.

The anyres geometry itself (best resolution, tiles, unpadding, square padding) is hand-checked in test_anyres.py.
"""
import json

import numpy as np
import pytest
from PIL import Image

from llava_ui.engine import Engine
from llava_ui.chat.conversation import Conversation
from llava_ui.chat.media import Frame, Video
from llava_ui.chat.prompt import IMAGE_MARKER, Message
from llava_ui.checkpoints.load import build_model, load_tokenizer
from llava_ui.checkpoints.weights import read_weights, weight_files
from llava_ui.commands import main as cli
from llava_ui.config import GenerationSettings
from llava_ui.errors import UserError
from llava_ui.model.processing import anyres_token_count, pad_to_square, pixel_views, prepare_images, preprocess

GREY = (127 / 255 - 0.5) / 0.5  # the padding colour (127, 127, 127) after SigLIP normalisation


def noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(str(tiny_dir), dtype="float32").load()


# ---- the oracle: transformers' LlavaNext built from our lmms-layout weights ----------------------------------

def lmms_to_llava_next(key: str) -> str:
    """lmms-lab weight name → LlavaNextForConditionalGeneration state-dict name (transformers 4.5x layout)."""
    renames = [
        ("model.vision_tower.vision_tower.", "model.vision_tower."),
        ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
        ("model.image_newline", "model.image_newline"),
        ("model.", "model.language_model."),  # embed_tokens, layers, norm
    ]
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key  # lm_head.weight


def llava_next_oracle(model_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    raw = json.loads((model_dir / "config.json").read_text())
    vision = raw["vision_config"]
    vision_config = transformers.SiglipVisionConfig(
        vision_use_head=False,
        **{k: vision[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "image_size", "patch_size", "layer_norm_eps", "hidden_act")})
    text_config = transformers.Qwen2Config(
        **{k: raw[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                               "max_position_embeddings", "tie_word_embeddings", "hidden_act")})
    config = transformers.LlavaNextConfig(
        vision_config=vision_config, text_config=text_config,
        # transformers reads pinpoints as [height, width], LLaVA-NeXT as [width, height] (see llava_ui/model/processing.py)
        image_grid_pinpoints=[[h, w] for w, h in raw["image_grid_pinpoints"]],
        vision_feature_select_strategy="full", vision_feature_layer=-1, projector_hidden_act="gelu",
        image_token_index=raw["vocab_size"] - 1,  # an unused id of the padded vocabulary
        tie_word_embeddings=raw["tie_word_embeddings"])
    model = transformers.LlavaNextForConditionalGeneration(config).eval()
    state = {lmms_to_llava_next(k): torch.from_numpy(np.array(v)) for k, v in read_weights(weight_files(model_dir)).items()}
    if raw["tie_word_embeddings"]:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    own = model.state_dict().keys()  # transformers 5 holds the SigLIP transformer itself: no `vision_model.` level
    state = {k if k in own else k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def oracle(checkpoints):
    return llava_next_oracle(checkpoints("lmms", vocab="bytes"))


@pytest.fixture(scope="module")
def ours(tiny_dir):
    model, config, _ = build_model(tiny_dir)  # paddlenlp layout, same seed-0 weights as the lmms one
    config.unpad_rounding = "transformers"  # the oracle's rounding (the product follows LLaVA-NeXT's)
    return model, config, load_tokenizer(tiny_dir)


# (width, height) → the canvas LLaVA-NeXT picks (cols x rows): wide 3x1, tall 1x3, square 2x2, odd 2x1,
# tiny 1x2 (the 384x768 / 768x384 tie that the pinpoint transpose settles), sliver 2x1 keeping 1 feature row.
SIZES = {"wide": (900, 300), "tall": (300, 800), "square": (500, 500), "odd": (517, 311), "tiny": (40, 25),
         "sliver": (600, 10)}


@pytest.mark.parametrize("name", SIZES)
def test_lone_image_anyres_logits_equal_transformers_llava_next(ours, oracle, name):
    import paddle
    import torch

    model, config, tokenizer = ours
    width, height = SIZES[name]
    image = noise(width, height, seed=len(name))
    ids = tokenizer.encode_prompt(None, [Message("user", "<image>\nWhat is in the picture?")])
    [plan] = prepare_images([image], "trained", config)
    pixels = pixel_views(image, plan, config)  # base view + tiles, row by row
    cols, rows = plan.grid
    assert plan.view == plan.pack == "anyres" and len(pixels) == 1 + cols * rows
    assert plan.tokens == anyres_token_count((width, height), config.image_grid_pinpoints)
    with paddle.no_grad():
        packed = model.pack_image(model.encode_views(pixels), plan.pack, plan.grid, plan.crop)
        embeds = model.embed_prompt(ids, [packed])
        logits = model.logits(model.forward_hidden(embeds)[0]).numpy()
    assert packed.shape[0] == plan.tokens

    # transformers expands its image token itself from (pixel_values, image_sizes=(h, w)) and raises when the
    # number of placeholders differs from the features it packs: plan.tokens copies must be exactly right.
    expanded = [t for i in ids for t in ([oracle.config.image_token_index] * plan.tokens if i == IMAGE_MARKER else [i])]
    with torch.no_grad():
        reference = oracle(input_ids=torch.tensor([expanded]), pixel_values=torch.from_numpy(pixels),
                           image_sizes=torch.tensor([[height, width]])).logits.numpy()
    assert logits.shape == reference.shape
    assert np.abs(logits - reference).max() <= 1e-4


def test_two_images_are_padded_to_squares_with_the_processor_mean_and_take_730_each(engine):
    wide, tall = noise(300, 100, seed=1), noise(60, 240, seed=2)
    conversation = Conversation()
    conversation.add_user("Compare <image> with <image>.", [wide, tall])
    plan = engine.plan(conversation, image_mode="trained")
    assert [(p.view, p.pack, p.tokens) for p in plan.images] == [("square", "newline", 730)] * 2
    assert plan.visual_tokens == 1460
    assert plan.prompt_tokens == len(plan.prompt_ids) - 2 + 1460

    for image, prepared in zip((wide, tall), plan.images):
        pixels = pixel_views(image, prepared, engine.config)
        assert np.array_equal(pixels, preprocess(pad_to_square(image, (127, 127, 127)))[None])
    # by hand: the 300x100 image sits in the middle third of a 300x300 grey square (rows 100..199 of 300)
    square = pixel_views(wide, plan.images[0], engine.config)[0]
    assert np.allclose(square[:, :120, :], GREY, atol=1e-6) and np.allclose(square[:, -120:, :], GREY, atol=1e-6)
    assert not np.allclose(square[:, 160:224, :], GREY, atol=0.05)
    # the 60x240 image: grey columns left and right
    square = pixel_views(tall, plan.images[1], engine.config)[0]
    assert np.allclose(square[:, :, :130], GREY, atol=1e-6) and np.allclose(square[:, :, -130:], GREY, atol=1e-6)

    rows, _ = engine.image_rows(plan)
    newline = engine.model.image_newline.numpy()
    for image, packed in zip((wide, tall), rows):
        square_pixels = preprocess(pad_to_square(image, (127, 127, 127)))[None]
        features = engine.run(engine.model.encode_views, square_pixels)[0].numpy()  # (the compute thread)
        assert packed.shape[0] == 730
        assert np.allclose(packed[:729].numpy(), features, atol=1e-5)
        assert np.array_equal(packed[729].numpy(), newline)


def test_video_frames_are_padded_to_squares_in_trained_mode(engine):
    frames = [Frame(noise(320, 180, seed=10 + i), index=i * 10, timestamp_s=i / 3) for i in range(3)]
    conversation = Conversation()
    conversation.add_user("What happens?", video=Video(frames=frames, total_frames=30, fps=30.0))
    plan = engine.plan(conversation, image_mode="trained")
    assert [(p.view, p.pack, p.tokens) for p in plan.images] == [("square", "newline", 730)] * 3
    pixels = pixel_views(frames[0].image, plan.images[0], engine.config)
    assert np.array_equal(pixels, preprocess(pad_to_square(frames[0].image, (127, 127, 127)))[None])


def test_lone_image_in_trained_mode_is_planned_as_anyres_by_the_engine(engine):
    conversation = Conversation()
    conversation.add_user("Describe it.", [noise(1000, 600)])
    # 1000x600 → 768x768 canvas (2x2 tiles) → 54x54 feature grid, unpadded to 54 cols x 32 rows (+1 newline each)
    [prepared] = engine.plan(conversation, image_mode="trained").images
    assert (prepared.view, prepared.pack, prepared.tokens) == ("anyres", "anyres", 729 + 32 * 55)


@pytest.mark.parametrize("layout", ["paddlenlp", "lmms"])
def test_default_mode_is_trained_for_checkpoints_with_image_newline_and_unpad(checkpoints, layout):
    engine = Engine(str(checkpoints(layout, vocab="bytes")), dtype="float32").load()
    assert engine.image_mode == "trained" and engine.status()["image_mode"] == "trained"


def test_default_mode_is_flat_for_a_llava_hf_checkpoint_and_the_others_are_refused(checkpoints):
    hf_dir = str(checkpoints("hf", vocab="bytes"))
    engine = Engine(hf_dir, dtype="float32").load()
    assert engine.image_mode == "flat" and engine.status()["image_mode"] == "flat"
    conversation = Conversation()
    conversation.add_user("Hi", [noise(64, 64)])
    assert [p.tokens for p in engine.plan(conversation).images] == [729]
    for mode in ("trained", "eval"):
        with pytest.raises(UserError, match=f"{mode}.*image_newline.*'flat'"):
            engine.plan(conversation, image_mode=mode)
        with pytest.raises(UserError, match=f"{mode}.*image_newline.*'flat'"):
            Engine(hf_dir, dtype="float32", image_mode=mode).load()


def test_context_budget_counts_the_five_views_of_a_lone_anyres_image(tiny_dir):
    small = Engine(str(tiny_dir), dtype="float32", context_length=1000).load()
    conversation = Conversation()
    conversation.add_user("Describe it.", [noise(1000, 1000)])
    needed = len(small.tokenizer.encode_prompt(None, conversation.messages())) - 1 + 729 + 54 * 55  # 3,699 visual
    with pytest.raises(UserError) as error:
        small.plan(conversation, image_mode="trained")
    assert f"needs {needed:,} tokens" in str(error.value) and "3,699" in str(error.value)
    assert "1,000" in str(error.value)

    final = small.generate(conversation, GenerationSettings(max_new_tokens=2, temperature=0), image_mode="eval")
    assert final.visual_tokens_per_image == [730] and final.image_mode == "eval"
    assert final.stats.prompt_tokens == needed - 3699 + 730 < 1000


@pytest.mark.parametrize("mode, tokens", [("trained", 729 + 54 * 55), ("eval", 730), ("flat", 729)])
def test_image_mode_flag_of_the_command_line_reaches_the_engine(tiny_dir, tmp_path, capsys, mode, tokens):
    path = tmp_path / "photo.png"
    noise(800, 800).save(path)
    code = cli.main(["generate", "--model", str(tiny_dir), "--image", str(path), "--prompt", "What is it?",
                     "--image-mode", mode, "--max-new-tokens", "1", "--temperature", "0", "--json"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and record["image_mode"] == mode and record["visual_tokens_per_image"] == [tokens]


def test_a_lone_image_is_unpadded_as_llava_next_trained_it(engine):
    """49×49 is where LLaVA-NeXT's truncation and transformers' rounding keep different rows (26 vs 28): the
    engine plans, packs and prefills LLaVA-NeXT's, and the inspector says so."""
    from llava_ui.web.inspector import summary

    conversation = Conversation()
    conversation.add_user("What is it?", [Image.new("RGB", (49, 49), (10, 200, 30))])
    final = engine.generate(conversation, GenerationSettings(max_new_tokens=2, temperature=0), image_mode="trained")
    assert final.visual_tokens_per_image == [729 + 26 * 28] != [anyres_token_count((49, 49), engine.config.image_grid_pinpoints, rounding="transformers")]
    assert "LLaVA-NeXT's, as trained" in summary(final, engine.context_length, [])

"""The Paddle model equals transformers' LlavaForConditionalGeneration on the same random weights."""
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llava_ui.chat.prompt import (  # noqa: E402
    IMAGE_MARKER,  # noqa: E402
    Message,
    place_images,
)
from llava_ui.checkpoints.load import (
    build_model,  # noqa: E402
    load_tokenizer,
)
from llava_ui.checkpoints.weights import read_weights, weight_files  # noqa: E402
from llava_ui.config import GenerationSettings  # noqa: E402
from llava_ui.engine.steps import generate_ids  # noqa: E402
from llava_ui.model.processing import preprocess  # noqa: E402

QUESTION = "Compare the first picture <image> with this one <image>: what changed?"


def two_images():
    rng = np.random.default_rng(7)
    a = Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 255, (420, 260, 3), dtype=np.uint8))
    return [a, b]


def reference(hf_dir):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    return model.eval()


def paddle_inputs(model, tokenizer, images, mode):
    ids = tokenizer.encode_prompt(None, [Message("user", place_images(QUESTION, len(images)))])
    pixels = np.stack([preprocess(im) for im in images])
    feats = model.encode_views(pixels)
    pack = {"eval": "newline", "flat": "flat"}[mode]
    rows = [model.pack_image(feats[i:i + 1], pack) for i in range(len(images))]
    return ids, model.embed_prompt(ids, rows)


def reference_embeds(hf, ids, images, newline):
    """transformers' embeddings with image features spliced at the markers, plus the newline row when given."""
    pixels = torch.from_numpy(np.stack([preprocess(im) for im in images]))
    with torch.no_grad():
        feats = hf.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full")
        feats = getattr(feats, "pooler_output", feats)  # transformers 5: the projected features per image
        embed = hf.get_input_embeddings()
        pieces, start, k = [], 0, 0
        slots = [i for i, t in enumerate(ids) if t == IMAGE_MARKER]
        for slot in slots + [len(ids)]:
            if slot > start:
                pieces.append(embed(torch.tensor(ids[start:slot])))
            if slot < len(ids):
                pieces.append(feats[k].reshape(-1, feats[k].shape[-1]))
                if newline is not None:
                    pieces.append(torch.from_numpy(newline)[None])
                k += 1
            start = slot + 1
        return torch.cat(pieces)[None]


def hf_greedy(hf, embeds, steps):
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, -steps:].tolist()


def assert_matches_reference(folder, hf_dir, layout, mode):
    """Logits ≤1e-4 and 20 identical greedy tokens for a prompt with two images inside the text."""
    import paddle

    model, config, detected = build_model(folder)
    assert detected == layout
    tokenizer = load_tokenizer(folder)
    hf = reference(hf_dir)
    images = two_images()
    ids, embeds = paddle_inputs(model, tokenizer, images, mode)
    newline = None
    if mode == "eval":
        newline = read_weights(weight_files(folder))[
            "qwen2.image_newline" if layout == "paddlenlp" else "model.image_newline"]
    ref = reference_embeds(hf, ids, images, newline)
    assert embeds.shape == list(ref.shape)
    assert embeds.shape[1] == len(ids) - 2 + 2 * (730 if mode == "eval" else 729)

    with paddle.no_grad():
        hidden, _ = model.forward_hidden(embeds)
        ours = model.logits(hidden).numpy()
    with torch.no_grad():
        theirs = hf(inputs_embeds=ref).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4

    settings = GenerationSettings(max_new_tokens=20, temperature=0)
    ours_ids = list(generate_ids(model, embeds, settings, stop_ids=set()))
    assert ours_ids == hf_greedy(hf, ref, 20)


@pytest.mark.parametrize("layout,tie,mode", [
    ("paddlenlp", True, "eval"), ("lmms", True, "eval"), ("hf", True, "flat"), ("paddlenlp", True, "flat"),
    ("lmms", False, "eval"), ("hf", False, "flat"),
])
def test_logits_and_greedy_tokens_match_transformers(checkpoints, layout, tie, mode):
    assert_matches_reference(checkpoints(layout, tie), checkpoints("hf", tie), layout, mode)


@pytest.mark.slow
@pytest.mark.parametrize("layout,mode", [("paddlenlp", "eval"), ("hf", "flat")])
def test_real_dimensions_match_transformers(tmp_path_factory, layout, mode):
    """1024×24 Qwen2 with the 152k vocabulary, 1152×26 SigLIP: the real model's shapes, random weights."""
    from llava_ui.checkpoints.random import write_random_checkpoint

    root = tmp_path_factory.mktemp("real")
    hf_dir = write_random_checkpoint(root / "hf", "hf", "real", vocab="qwen")
    folder = hf_dir if layout == "hf" else write_random_checkpoint(root / layout, layout, "real", vocab="qwen")
    assert_matches_reference(folder, hf_dir, layout, mode)


def test_flat_mode_with_image_tokens_matches_transformers_forward(checkpoints):
    """transformers' own image-token path (input_ids + pixel_values) gives the same logits as our flat splice."""
    import paddle

    hf_dir = checkpoints("hf")
    model, config, _ = build_model(hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    hf = reference(hf_dir)
    images = two_images()
    ids, embeds = paddle_inputs(model, tokenizer, images, "flat")
    image_token = config.image_token_index
    expanded = []
    for t in ids:
        expanded.extend([image_token] * 729 if t == IMAGE_MARKER else [t])
    pixels = torch.from_numpy(np.stack([preprocess(im) for im in images]))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([expanded]), pixel_values=pixels).logits.numpy()
    with paddle.no_grad():
        ours = model.logits(model.forward_hidden(embeds)[0]).numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_new_transformers_key_names_load(checkpoints):
    model, _, layout = build_model(checkpoints("hf", hf_naming="new"))
    legacy, _, _ = build_model(checkpoints("hf"))
    assert layout == "hf"
    ours, theirs = dict(model.named_parameters()), dict(legacy.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[name].numpy(), theirs[name].numpy()) for name in ours)
    # q/k/v and gate/up live in the runner's per-worker parts once loaded
    assert np.array_equal(model.runner.parts[0][0][0].qkv.numpy(), legacy.runner.parts[0][0][0].qkv.numpy())


def test_plain_rms_norm_matches_transformers(checkpoints, monkeypatch):
    """The RMSNorm a CPU without AVX-512 runs (Paddle's fused kernel dies there with SIGILL): the same parity,
    whichever CPU runs the test."""
    from llava_ui.model import qwen2

    monkeypatch.setattr(qwen2, "FUSED_CPU_NORM", False)
    assert_matches_reference(checkpoints("lmms", True), checkpoints("hf", True), "lmms", "eval")

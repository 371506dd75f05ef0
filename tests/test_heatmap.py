"""Where the model looked, drawn (issue 36, part 2, inspector): a synthetic attention row with one hot patch lands on
the right region of the picture as the user sees it, for every way an image becomes visual tokens (squashed, padded
to a square, anyres base view and tiles); values are normalised within a view with a percentile clip; each
image's share plus the text's share is all the attention."""
import re

import numpy as np
import pytest
from PIL import Image

from llava_ui.config import ModelConfig, VisionConfig
from llava_ui.model.processing import prepare_images
from llava_ui.web.heatmap import DISPLAY, base_view, image_maps, normalised, tiles_view
from llava_ui.web.looked import WHOLE, AnsweredImages, attention_by_image, look, selected, shares_html

SIDE = 27
GREY = (128, 128, 128)
CONFIG = ModelConfig(layout="paddlenlp", text={}, vision=VisionConfig(), mm_hidden_size=1152,
                     merge_type="spatial_unpad")


def prepared(size, mode: str, images: int = 1):
    pictures = [Image.new("RGB", size, GREY)] * images
    return pictures[0], prepare_images(pictures, mode, CONFIG, digests=["x"] * images)[0]


def hot_box(drawn: Image.Image):
    """(left, top, right, bottom) of the pixels drawn at full strength: the ramp's bright yellow over grey (not
    the white tile grid)."""
    pixels = np.asarray(drawn).astype(int)
    ys, xs = np.nonzero((pixels[..., 0] > 200) & (pixels[..., 1] > 200) & (pixels[..., 2] < 200))
    if not len(xs):
        return None
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def one_hot(tokens: int, *positions: int) -> np.ndarray:
    weights = np.zeros(tokens)
    weights[list(positions)] = 1.0
    return weights


def assert_near(box, expected, slack: float = 1.5):
    assert box is not None, "nothing drawn at full strength"
    assert np.abs(np.array(box) - np.array(expected)).max() <= slack, (box, expected)


@pytest.mark.parametrize("mode, tokens", [("flat", 729), ("eval", 730)])
def test_a_squashed_image_map_is_stretched_back_over_its_aspect(mode, tokens):
    picture, image = prepared((400, 200), mode)
    assert image.view == "squash" and image.tokens == tokens
    row, col = 13, 20
    drawn = base_view(picture, image_maps(one_hot(tokens, row * SIDE + col), image), image.view)
    assert drawn.size == (DISPLAY, DISPLAY // 2)  # the picture's own aspect, not the model's square
    w, h = DISPLAY / SIDE, DISPLAY / 2 / SIDE  # a patch is twice as wide as tall here
    assert_near(hot_box(drawn), (col * w, row * h, (col + 1) * w, (row + 1) * h))


def test_several_images_map_over_the_padded_square_cropped_to_the_picture():
    picture, image = prepared((400, 200), "trained", images=2)
    assert image.view == "square" and image.tokens == 730
    patch = DISPLAY / SIDE  # the square's side is the picture's longer side: patches stay square
    top = DISPLAY // 4  # the picture sat in the middle half of the square
    row, col = 13, 20
    drawn = base_view(picture, image_maps(one_hot(730, row * SIDE + col), image), image.view)
    assert drawn.size == (DISPLAY, DISPLAY // 2)
    assert_near(hot_box(drawn), (col * patch, row * patch - top, (col + 1) * patch, (row + 1) * patch - top))
    in_padding = base_view(picture, image_maps(one_hot(730, 3 * SIDE + col), image), image.view)
    assert hot_box(in_padding) is None  # a patch of the grey padding has no place on the picture


def test_a_lone_anyres_image_shows_its_base_view_and_the_cropped_tiles():
    picture, image = prepared((900, 600), "trained")
    assert image.view == "anyres" and image.grid == (2, 2)  # 768 x 768 keeps the most pixels
    top, bottom, left, right = image.crop
    assert (top, bottom, left, right) == (9, 45, 0, 2 * SIDE)  # 3:2 on a square canvas: 36 of 54 rows kept
    kept_rows, kept_cols = bottom - top, right - left
    assert image.tokens == SIDE * SIDE + kept_rows * (kept_cols + 1)
    base_row, base_col, row, col = 5, 9, 10, 3  # the tiles' hot patch: row 10 of the kept rows
    tile_position = SIDE * SIDE + row * (kept_cols + 1) + col
    newline = SIDE * SIDE + row * (kept_cols + 1) + kept_cols
    weights = one_hot(image.tokens, base_row * SIDE + base_col, tile_position)
    weights[newline] = 0.5  # a newline takes attention but has no place on the picture
    maps = image_maps(weights, image)
    assert maps.share == pytest.approx(2.5) and maps.tiles.sum() == pytest.approx(1.0)
    w, h = DISPLAY / SIDE, DISPLAY * 2 / 3 / SIDE
    assert_near(hot_box(base_view(picture, maps, image.view)),
                (base_col * w, base_row * h, (base_col + 1) * w, (base_row + 1) * h))
    tiles = tiles_view(picture, maps, image)
    assert tiles.size == (2 * DISPLAY, 2 * DISPLAY)  # the 2 x 2 tile canvas
    patch = 2 * DISPLAY / (2 * SIDE)
    y = (top + row) * patch
    assert_near(hot_box(tiles), (col * patch, y, (col + 1) * patch, y + patch))
    assert tuple(np.asarray(tiles)[round(top * patch), DISPLAY // 3]) == (0, 220, 255)  # the crop's edge, cyan


def test_one_sink_patch_does_not_wash_the_map_out():
    values = np.full(729, 0.001)
    values[:20] = np.linspace(0.002, 0.004, 20)
    values[400] = 0.5  # a sink
    levels = normalised(values)
    assert levels[400] == 1.0 and levels[19] == 1.0  # the clip: the top percent drawn at full strength
    assert levels[0] > 0.4 and levels[100] > 0.2  # the rest is still visible, not crushed to black by the sink


def test_a_token_and_a_band_of_layers_select_their_rows():
    attention = [[[[t + 10 * layer + 100 * k] * 3 for k in range(2)] for layer in range(4)] for t in range(5)]
    arrays = attention_by_image(attention)
    assert [a.shape for a in arrays] == [(5, 4, 3)] * 2
    assert selected(arrays, "2", 2, 3)[1].tolist() == [2 + 15 + 100] * 3  # token 3, layers 2-3 (0-based 1, 2)
    assert selected(arrays, WHOLE, 4, 1)[0].tolist() == [2 + 15] * 3  # the whole answer, either order of the band


def test_image_shares_and_the_text_share_are_all_the_attention(checkpoints, capsys):
    """Each image's share from the engine's rows plus the text's share from transformers' full rows is 1: the
    visual positions the inspector sums are exactly the images'."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_attention import IMAGES, QUESTION, reference_rows

    from llava_ui.engine import get_engine
    from llava_ui.chat.conversation import Conversation
    from llava_ui.config import GenerationSettings

    hf_dir = checkpoints("hf")
    engine = get_engine(str(hf_dir), hub=None, device=None, dtype="float32", image_mode="flat", context_length=None, batch_slots=1)
    conversation = Conversation()
    conversation.add_user_files(QUESTION, IMAGES)
    plan = engine.plan(conversation, "flat")
    record = engine.generate(conversation, GenerationSettings(max_new_tokens=4, temperature=0, attention=True))
    layers = len(record.attention[0])
    pictures = [Image.open(path).convert("RGB") for path in IMAGES]
    images = AnsweredImages(pictures, prepare_images(pictures, "flat", engine.config), ["image 1", "image 2"])
    looked = look(selected(attention_by_image(record.attention), WHOLE, 1, layers), images)
    rows, ids = reference_rows(hf_dir, plan.prompt_ids, engine.config.image_token_index, record.token_ids)
    text_keys = np.array([t != engine.config.image_token_index for t in ids + record.token_ids[:-1]])
    text_share = np.mean([layer[:, text_keys[:layer.shape[1]]].sum(axis=1) for layer in rows])
    assert 0 < min(looked.shares) and sum(looked.shares) < 1
    assert sum(looked.shares) + text_share == pytest.approx(1.0, abs=1e-4)
    assert looked.text_share == pytest.approx(text_share, abs=1e-4)
    shown = [float(v) for v in re.findall(r'share-value">([\d.]+) %', shares_html(looked, images.labels))]
    assert len(shown) == 3 and sum(shown) == pytest.approx(100, abs=0.15)  # two bars and the text, as drawn
    assert len(looked.heatmaps) == 2 and all("% of the attention" in caption for _, caption in looked.heatmaps)

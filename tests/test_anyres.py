"""Anyres geometry of the `trained` behaviour: hand-computed cases, then cross-checks against transformers.

Sizes are (width, height), grids (cols, rows), feature maps (rows, cols), as in llava_ui.anyres.
"""

import numpy as np
import pytest
from PIL import Image

from llava_ui.model.processing import (
    anyres_token_count,
    anyres_views,
    cut_tiles,
    pad_to_square,
    resize_and_pad,
    select_best_resolution,
    unpad_crop,
    unpadded_grid_size,
)

PINPOINTS = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
# transformers reads pinpoints as [height, width]; transposed, it reads them the way LLaVA-NeXT trained.
PINPOINTS_HW = [[h, w] for w, h in PINPOINTS]

HAND_SIZES = [(1000, 1000), (640, 480), (2000, 300), (300, 2000), (10, 10), (385, 767), (49, 49)]
SWEEP_SIZES = HAND_SIZES + [
    (w, h)
    for w in (1, 7, 60, 200, 383, 384, 385, 500, 767, 768, 769, 1151, 1153, 1600)
    for h in (1, 9, 100, 384, 700, 1200)
]


def test_square_image_picks_the_square_canvas():
    # 1000x1000: 384x768 -> scale min(.384, .768) = .384 -> 384*384 = 147456 kept
    #            768x768 -> scale .768 -> 768*768 = 589824 kept (the most) -> 2 cols x 2 rows
    assert select_best_resolution((1000, 1000), PINPOINTS) == (768, 768)


def test_landscape_photo_picks_the_square_canvas():
    # 640x480: 768x384 -> scale min(1.2, .8) = .8 -> 512*384 = 196608; 1152x384 the same
    #          768x768 -> scale min(1.2, 1.6) = 1.2 > 1 -> all 307200 pixels kept
    assert select_best_resolution((640, 480), PINPOINTS) == (768, 768)


def test_very_wide_image_picks_the_widest_canvas():
    # 2000x300: 768x384 -> scale .384 -> 768 * int(115.2) = 88320
    #           1152x384 -> scale min(.576, 1.28) = .576 -> 1152 * int(172.8) = 198144 (the most)
    assert select_best_resolution((2000, 300), PINPOINTS) == (1152, 384)


def test_very_tall_image_picks_the_tallest_canvas():
    # 300x2000: the transpose of the wide case -> 384 wide x 1152 tall
    assert select_best_resolution((300, 2000), PINPOINTS) == (384, 1152)


def test_tiny_image_ties_and_the_first_pinpoint_wins():
    # 10x10: every canvas upscales, so every one keeps all 100 pixels; wasted area 384*768 - 100 for both
    # 384x768 and 768x384 (less than 768x768 or 1152x384) -> tie -> the first listed, read as (w, h) = 384x768
    assert select_best_resolution((10, 10), PINPOINTS) == (384, 768)


def test_one_pixel_over_a_tile_tips_to_the_square_canvas():
    # 385x767: 384x768 -> scale min(384/385, 768/767) = .9974 -> int(384.0)*int(765.0) ~ 293k kept
    #          768x768 -> scale min(1.99, 1.0013) > 1 -> all 385*767 = 295295 kept -> 768x768
    assert select_best_resolution((385, 767), PINPOINTS) == (768, 768)


def test_resize_and_pad_fills_the_limiting_side_and_centers_on_black():
    # 2000x300 into 1152x384: scale_w .576 < scale_h 1.28 -> width 1152, height ceil(172.8) = 173,
    # pasted at y = (384 - 173) // 2 = 105, so rows 105..277 are image and the rest black.
    image = Image.new("RGB", (2000, 300), (200, 10, 10))
    canvas = np.asarray(resize_and_pad(image, (1152, 384)))
    assert canvas.shape == (384, 1152, 3)
    image_rows = np.flatnonzero(canvas[:, 576, 0] > 0)
    assert (image_rows[0], image_rows[-1]) == (105, 277)
    assert (canvas[:105] == 0).all() and (canvas[278:] == 0).all()


def test_resize_and_pad_rounds_the_free_side_up():
    # 385x767 into 768x768: scale_h 768/767 < scale_w 768/385 -> height 768, width ceil(385.50) = 386,
    # pasted at x = (768 - 386) // 2 = 191.
    canvas = np.asarray(resize_and_pad(Image.new("RGB", (385, 767), (255, 255, 255)), (768, 768)))
    image_cols = np.flatnonzero(canvas[384, :, 0] > 0)
    assert (image_cols[0], image_cols[-1]) == (191, 191 + 386 - 1)


def test_tiles_are_cut_row_by_row():
    # a 3 cols x 2 rows canvas whose tile (col, row) is painted 40 * (row * 3 + col)
    canvas = Image.new("RGB", (1152, 768))
    for row in range(2):
        for col in range(3):
            canvas.paste((40 * (row * 3 + col),) * 3, (col * 384, row * 384, (col + 1) * 384, (row + 1) * 384))
    tiles = cut_tiles(canvas)
    assert [t.size for t in tiles] == [(384, 384)] * 6
    assert [t.getpixel((0, 0))[0] for t in tiles] == [0, 40, 80, 120, 160, 200]


def test_tiles_need_a_canvas_made_of_whole_tiles():
    with pytest.raises(ValueError):
        cut_tiles(Image.new("RGB", (400, 384)))


def test_views_are_the_squashed_image_then_the_tiles():
    image = Image.new("RGB", (2000, 300), (0, 255, 0))
    views, grid = anyres_views(image, PINPOINTS)
    assert grid == (3, 1)
    assert len(views) == 1 + 3
    assert all(v.size == (384, 384) for v in views)
    # the base view is squashed, not padded: no black rows
    assert np.asarray(views[0])[:, :, 1].min() == 255


def test_wide_image_is_padded_above_and_below_with_the_mean_colour():
    # 100x40 -> 100x100 canvas, image pasted at (0, (100 - 40) // 2) = (0, 30)
    square = np.asarray(pad_to_square(Image.new("RGB", (100, 40), (255, 0, 0))))
    assert square.shape == (100, 100, 3)
    assert (square[:30] == 127).all() and (square[70:] == 127).all()
    assert (square[30:70] == (255, 0, 0)).all()


def test_tall_image_is_padded_left_and_right():
    # 41x100 -> pasted at ((100 - 41) // 2, 0) = (29, 0): columns 29..69 are image
    square = np.asarray(pad_to_square(Image.new("RGB", (41, 100), (0, 0, 255)), fill=(1, 2, 3)))
    assert (square[:, :29] == (1, 2, 3)).all() and (square[:, 70:] == (1, 2, 3)).all()
    assert (square[:, 29:70] == (0, 0, 255)).all()


def test_square_image_is_left_as_is():
    image = Image.new("RGB", (64, 64), (9, 9, 9))
    assert pad_to_square(image) is image


@pytest.mark.parametrize(
    "image_size, grid, expected",
    [
        # 1000x1000 on 2x2 (54x54 map): same aspect -> width branch, 1000 * 54/1000 = 54 -> nothing cut
        ((1000, 1000), (2, 2), (54, 54)),
        # 640x480 on 2x2: 4/3 > 1 -> rows cut; 480 * 54/640 = 40.5 -> 40, pad (54-40)//2 = 7 -> 54-14 = 40
        ((640, 480), (2, 2), (40, 54)),
        # 2000x300 on 3x1 (27x81 map): 6.67 > 3 -> rows; 300 * 81/2000 = 12.15 -> 12, pad 7 -> 27-14 = 13
        ((2000, 300), (3, 1), (13, 81)),
        # 300x2000 on 1x3 (81x27 map): .15 < .33 -> cols; 12.15 -> 12, pad 7 -> 13
        ((300, 2000), (1, 3), (81, 13)),
        # 10x10 on 1x2 (54x27 map): 1 > .5 -> rows; 10 * 27/10 = 27, pad (54-27)//2 = 13 -> 54-26 = 28 (odd gap)
        ((10, 10), (1, 2), (28, 27)),
        # 385x767 on 2x2: .502 < 1 -> cols; 385 * 54/767 = 27.1 -> 27, pad 13 -> 28
        ((385, 767), (2, 2), (54, 28)),
        # 49x49 on 1x2: 49 * (27/49) = 26.999999999999996; LLaVA-NeXT's int() -> 26, pad 14 -> 26
        # (transformers' round(.., 7) gives 27, pad 13 -> 28: the one place the two references disagree)
        ((49, 49), (1, 2), (26, 27)),
    ],
)
def test_unpadded_grid_size_matches_hand_arithmetic(image_size, grid, expected):
    assert unpadded_grid_size(image_size, grid) == expected


def test_the_unpad_rounding_follows_llava_next_and_transformers_stays_reachable():
    assert unpadded_grid_size((49, 49), (1, 2)) == (26, 27)  # LLaVA-NeXT (training): int()
    assert unpadded_grid_size((49, 49), (1, 2), rounding="transformers") == (28, 27)
    assert anyres_token_count((49, 49), PINPOINTS) == 729 + 26 * 28
    assert anyres_token_count((49, 49), PINPOINTS, rounding="transformers") == 729 + 28 * 28
    assert unpadded_grid_size((640, 480), (2, 2)) == unpadded_grid_size((640, 480), (2, 2), rounding="transformers")


def test_thin_sliver_keeps_no_tile_features():
    # 384x9: 384x768 and 768x384 both keep all 3456 pixels and waste the same -> tie -> 384x768 (1x2 grid);
    # on the 54x27 map 9 * 27/384 = .63 -> 0 rows kept, pad 27 -> 54-54 = 0: only the base view remains.
    assert unpadded_grid_size((384, 9), (1, 2)) == (0, 27)
    assert anyres_token_count((384, 9), PINPOINTS) == 729


def test_unpad_crop_cuts_padding_evenly():
    # 2000x300 on a 27x81 map: pad 7 rows at the top and 7 at the bottom
    assert unpad_crop(27, 81, (2000, 300)) == (7, 20, 0, 81)
    # 300x2000 on an 81x27 map: pad 7 columns on each side
    assert unpad_crop(81, 27, (300, 2000)) == (0, 81, 7, 20)


@pytest.mark.parametrize(
    "image_size, expected",
    [
        ((1000, 1000), 729 + 54 * 55),  # 3699
        ((640, 480), 729 + 40 * 55),  # 2929
        ((2000, 300), 729 + 13 * 82),  # 1795
        ((300, 2000), 729 + 81 * 14),  # 1863: a newline per row makes tall images dearer
        ((10, 10), 729 + 28 * 28),  # 1513
        ((385, 767), 729 + 54 * 29),  # 2295
    ],
)
def test_token_count_is_base_view_plus_unpadded_rows_with_newlines(image_size, expected):
    assert anyres_token_count(image_size, PINPOINTS) == expected


# Cross-checks against transformers (test-only dependency).


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import image_processing_utils
    from transformers.models.llava_next import modeling_llava_next

    return image_processing_utils, modeling_llava_next


def test_best_resolution_equals_transformers_given_transposed_pinpoints(hf):
    image_processing_utils, _ = hf
    for width, height in SWEEP_SIZES:
        theirs_h, theirs_w = image_processing_utils.select_best_resolution((height, width), PINPOINTS_HW)
        assert select_best_resolution((width, height), PINPOINTS) == (theirs_w, theirs_h), (width, height)


def test_raw_pinpoints_in_transformers_differ_only_on_ties(hf):
    # Fed the config list as is, transformers reads [384, 768] as 384 tall x 768 wide: same candidates,
    # opposite order, so only ties (images within 384x384, or slivers) come out transposed.
    image_processing_utils, _ = hf
    for width, height in SWEEP_SIZES:
        theirs_h, theirs_w = image_processing_utils.select_best_resolution((height, width), PINPOINTS)
        ours = select_best_resolution((width, height), PINPOINTS)
        if ours != (theirs_w, theirs_h):
            assert (theirs_w, theirs_h) == (ours[1], ours[0]) == (768, 384), (width, height)
            assert (width <= 384 and height <= 384) or min(width, height) < 8, (width, height)
    assert image_processing_utils.select_best_resolution((10, 10), PINPOINTS) == (384, 768)  # (h, w): wide


def test_grid_and_unpad_equal_transformers(hf):
    torch = pytest.importorskip("torch")
    _, modeling = hf
    for width, height in SWEEP_SIZES:
        target = select_best_resolution((width, height), PINPOINTS)
        cols, rows = target[0] // 384, target[1] // 384
        assert modeling.get_anyres_image_grid_shape((height, width), PINPOINTS_HW, 384) == (rows, cols)
        assert modeling.image_size_to_num_patches((height, width), PINPOINTS_HW, 384) == 1 + rows * cols
        feature_map = torch.arange(rows * 27 * cols * 27).reshape(1, rows * 27, cols * 27)
        top, bottom, left, right = unpad_crop(rows * 27, cols * 27, (width, height), "transformers")
        unpadded = modeling.unpad_image(feature_map, (height, width))
        assert torch.equal(unpadded, feature_map[:, top:bottom, left:right]), (width, height)
        assert tuple(unpadded.shape[1:]) == unpadded_grid_size((width, height), (cols, rows), rounding="transformers")


def test_token_count_and_order_equal_transformers_packing(hf):
    # pack_image_features only reads self.config, so a namespace stands in for the model.
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    _, modeling = hf
    vision_config = SimpleNamespace(image_size=384, patch_size=14)
    fake_model = SimpleNamespace(config=SimpleNamespace(vision_config=vision_config, image_grid_pinpoints=PINPOINTS_HW))
    newline = torch.full((1,), -1.0)
    for width, height in SWEEP_SIZES:
        target = select_best_resolution((width, height), PINPOINTS)
        views = 1 + (target[0] // 384) * (target[1] // 384)
        features = torch.arange(views * 729, dtype=torch.float32).reshape(views, 729, 1)
        packed, lengths = modeling.LlavaNextModel.pack_image_features(
            fake_model, [features], torch.tensor([[height, width]]), "full", image_newline=newline
        )
        assert lengths.tolist() == [anyres_token_count((width, height), PINPOINTS, rounding="transformers")], \
            (width, height)
        packed = packed[0][:, 0]
        assert torch.equal(packed[:729], torch.arange(729.0))  # base view first, no newline after it
        rows, _ = unpadded_grid_size((width, height), (target[0] // 384, target[1] // 384), rounding="transformers")
        assert int((packed == -1.0).sum()) == rows
        assert rows == 0 or packed[-1] == -1.0  # the last feature row ends with a newline


def _normalised(views):
    return np.stack([((np.asarray(v, dtype=np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1) for v in views])


def _siglip_anyres_processor(pinpoints):
    transformers = pytest.importorskip("transformers")
    return transformers.LlavaNextImageProcessor(
        size={"height": 384, "width": 384},
        crop_size={"height": 384, "width": 384},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        image_grid_pinpoints=pinpoints,
        resample=Image.BICUBIC,
        do_pad=True,
    )


def _test_image(width, height):
    # a smooth gradient plus noise, so resampling differences would show
    rng = np.random.default_rng(width * 10007 + height)
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noisy = gradient + rng.integers(-30, 31, gradient.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("image_size", [(640, 480), (2000, 300), (300, 2000), (385, 767), (1000, 1000), (10, 10)])
def test_view_pixels_equal_transformers_processor(hf, image_size):
    image = _test_image(*image_size)
    theirs = _siglip_anyres_processor(PINPOINTS_HW)(image, return_tensors="np")
    views, _ = anyres_views(image, PINPOINTS)
    assert theirs["image_sizes"][0].tolist() == [image_size[1], image_size[0]]
    assert theirs["pixel_values"].shape[1] == len(views)
    # Both resize with PIL BICUBIC on uint8 and pad with zeros at the same offsets: equal up to float rounding.
    np.testing.assert_allclose(theirs["pixel_values"][0], _normalised(views), atol=1e-5)


def test_raw_pinpoints_in_transformers_tile_small_images_the_other_way(hf):
    image = _test_image(10, 10)
    theirs = _siglip_anyres_processor(PINPOINTS)(image, return_tensors="np")["pixel_values"][0]
    views, grid = anyres_views(image, PINPOINTS)
    assert grid == (1, 2) and theirs.shape[0] == len(views) == 3
    np.testing.assert_allclose(theirs[0], _normalised(views[:1])[0], atol=1e-5)  # base views agree
    assert np.abs(theirs[1:] - _normalised(views[1:])).max() > 0.5  # tiles are 2 wide, not 2 tall

"""Where the model looked, drawn: one image's attention weights laid back over the picture as the user sees it.

The weights come in the order of the image's visual positions in the prompt, which processing.PreparedImage
describes: a `squash` view (eval, flat) is the 27x27 patches of the picture squashed to 384, so the map is
stretched back over the picture's own aspect; a `square` view (trained, several images or frames) is the patches
of the picture padded to a square, so the map covers the padded square and is cropped to the picture; an `anyres`
image (trained, one image) is the base view (squashed) followed by the tiles' feature grid cut to the picture
(`crop`), one image_newline after every kept row. Newline positions take attention too: they count in the
image's share but have no place on the picture.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from llava_ui.model.processing import fitted_size

CLIP_PERCENTILE = 99  # values above it are drawn at full strength: one sink patch must not wash the map out
DISPLAY = 320  # longest side of a drawn map, in pixels
# an "inferno"-like ramp: dark (little attention) to bright yellow (the most)
RAMP = [(0.0, (0, 0, 4)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)), (0.75, (249, 142, 9)), (1.0, (252, 255, 164))]


@dataclass
class ImageMaps:
    """One image's attention laid out as its views: `base` [side, side] (the squashed, square-padded or anyres
    base view), `tiles` [grid rows * side, grid cols * side] for anyres (zero outside the kept crop), and the
    image's share: the sum of all its weights, newlines included."""

    base: np.ndarray
    tiles: np.ndarray | None
    share: float


def image_maps(weights, prepared, side: int = 27) -> ImageMaps:
    """Split one image's weights (one per visual position) into its views' maps."""
    weights = np.asarray(weights, dtype=np.float64)
    patches = side * side
    base = weights[:patches].reshape(side, side)
    tiles = None
    if prepared.view == "anyres":
        cols, rows = prepared.grid
        top, bottom, left, right = prepared.crop
        tiles = np.zeros((rows * side, cols * side))
        kept = bottom - top
        if kept:
            grid = weights[patches:].reshape(kept, -1)[:, :-1]  # the last column of each row is its newline
            tiles[top:bottom, left:right] = grid
    return ImageMaps(base, tiles, float(weights.sum()))


def normalised(values: np.ndarray, percentile: float = CLIP_PERCENTILE) -> np.ndarray:
    """Values divided by the view's `percentile`-th percentile and clipped to [0, 1]."""
    top = float(np.percentile(values, percentile)) if values.size else 0.0
    if top <= 0:
        top = float(values.max()) if values.size and values.max() > 0 else 1.0
    return np.clip(values / top, 0.0, 1.0)


def colours(levels: np.ndarray) -> np.ndarray:
    """Levels in [0, 1] → RGB uint8 along RAMP."""
    stops = np.array([s for s, _ in RAMP])
    rgb = np.array([c for _, c in RAMP], dtype=np.float64)
    return np.stack([np.interp(levels, stops, rgb[:, k]) for k in range(3)], axis=-1).astype(np.uint8)


def blend(picture: Image.Image, levels: np.ndarray) -> Image.Image:
    """The picture with `levels` (a [rows, cols] map in [0, 1]) coloured over it, stretched over the whole picture
    patch by patch (no smoothing: a patch stays a patch); the more attention, the more opaque."""
    picture = picture.convert("RGB")
    level = np.asarray(Image.fromarray((levels * 255).astype(np.uint8)).resize(picture.size, Image.NEAREST)) / 255.0
    alpha = (0.2 + 0.7 * level)[..., None]
    mixed = np.asarray(picture, dtype=np.float64) * (1 - alpha) + colours(level) * alpha
    return Image.fromarray(mixed.astype(np.uint8))


def shown_picture(picture: Image.Image, longest: int = DISPLAY) -> Image.Image:
    """The picture at display size (its aspect kept)."""
    scale = longest / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.convert("RGB").resize(size, Image.BICUBIC)


def base_view(picture: Image.Image, maps: ImageMaps, view: str, longest: int = DISPLAY) -> Image.Image:
    """The base map over the picture as the user sees it: stretched back over the picture (squash, anyres base),
    or over the square the picture was padded to, cropped to the picture (square)."""
    shown = shown_picture(picture, longest)
    levels = normalised(maps.base)
    if view != "square":
        return blend(shown, levels)
    width, height = shown.size
    side = max(width, height)
    # the picture sat centred on the padded square: stretch the map over that square, keep the picture's part
    left, top = (side - width) // 2, (side - height) // 2
    square = Image.new("RGB", (side, side))
    square.paste(shown, (left, top))
    return blend(square, levels).crop((left, top, left + width, top + height))


def tiles_view(picture: Image.Image, maps: ImageMaps, prepared, longest: int = DISPLAY * 2) -> Image.Image:
    """Anyres: the picture resized and padded to its grid as the tiles saw it, the tiles' map over it (only the
    kept crop has values), the tile grid in white and the unpadded crop in cyan."""
    cols, rows = prepared.grid
    scale = longest / max(cols, rows)  # the grid's tiles are square
    canvas_size = (round(cols * scale), round(rows * scale))
    fitted = fitted_size(picture.size, canvas_size)
    canvas = Image.new("RGB", canvas_size)
    canvas.paste(picture.convert("RGB").resize(fitted, Image.BICUBIC),
                 ((canvas_size[0] - fitted[0]) // 2, (canvas_size[1] - fitted[1]) // 2))
    top, bottom, left, right = prepared.crop
    drawn = blend(canvas, _crop_levels(maps.tiles, prepared.crop))
    draw = ImageDraw.Draw(drawn)
    for c in range(1, cols):
        x = round(c * canvas_size[0] / cols)
        draw.line([(x, 0), (x, canvas_size[1])], fill="white", width=1)
    for r in range(1, rows):
        y = round(r * canvas_size[1] / rows)
        draw.line([(0, y), (canvas_size[0], y)], fill="white", width=1)
    per_row, per_col = canvas_size[1] / maps.tiles.shape[0], canvas_size[0] / maps.tiles.shape[1]
    draw.rectangle([round(left * per_col), round(top * per_row), round(right * per_col) - 1,
                    round(bottom * per_row) - 1], outline=(0, 220, 255), width=2)
    return drawn


def _crop_levels(tiles: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """The tiles' map normalised over the kept crop only (the padding cut off holds no positions)."""
    top, bottom, left, right = crop
    levels = np.zeros_like(tiles)
    if bottom > top and right > left:
        levels[top:bottom, left:right] = normalised(tiles[top:bottom, left:right])
    return levels

"""How images become the vision tower's input and the prompt's visual tokens: the `trained`,
`eval` and `flat` behaviours, LLaVA-NeXT's anyres tiling and unpadding, and SigLIP's preprocessing.

Each image of a request becomes a PreparedImage when it is planned: how its pixels are viewed, how its features
are packed, its anyres grid and how many prompt positions it takes, all known before any compute (the context
budget needs the counts). Pure functions on PIL images and numbers; no model code. Every size here is (width, height), the PIL
convention, and every grid is (cols, rows), except the feature-map shapes, which are (rows, cols) like the
tensors they describe.

Pinpoint order. The checkpoint's `image_grid_pinpoints` ([[384, 768], [768, 384], [768, 768], [1152, 384],
[384, 1152]]) is read as [width, height] by LLaVA-NeXT (`mm_utils.select_best_resolution` loops
`for width, height in possible_resolutions` and is given `image.size`), and that is how the model was trained.
transformers' `LlavaNextImageProcessor` and `LlavaNextForConditionalGeneration` read the same list as
[height, width] and pass image sizes as (height, width). The list holds every pinpoint together with its
transpose, so both read the same set; only the order of equal candidates differs. For an image with both sides
<= 384 (or a sliver a few pixels thin) the 384x768 and 768x384 candidates tie (both keep every pixel, both waste
the same area) and the first one listed wins: LLaVA-NeXT picks 384 wide x 768 tall (1 col x 2 rows),
transformers 768 wide x 384 tall (2 cols x 1 row). We follow LLaVA-NeXT (training). To make transformers compute
the same thing, give it the pinpoints transposed: `[[h, w] for w, h in pinpoints]`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from llava_ui.chat.media import image_digest
from llava_ui.config import IMAGE_MODES, ModelConfig
from llava_ui.errors import UserError

PROCESSOR_MEAN = (0.5, 0.5, 0.5)  # SigLIP's image mean (and std)
TILE = 384
PATCHES_PER_SIDE = 27  # 384 // 14


def select_best_resolution(image_size, pinpoints):
    """Pick the pinpoint (width, height) that keeps the most image pixels, then wastes the least canvas.

    image_size is (width, height); each pinpoint is [width, height]. Ties keep the earlier pinpoint.
    """
    width, height = image_size
    best_fit = None
    best_kept, best_wasted = 0, float("inf")
    for target_width, target_height in pinpoints:
        scale = min(target_width / width, target_height / height)
        # Upscaling adds no information, so the kept resolution is capped at the image's own.
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best_fit = (target_width, target_height)
            best_kept, best_wasted = kept, wasted
    return best_fit


def fitted_size(image_size, target):
    """(width, height) of the image scaled to fit inside target: the limiting side is filled exactly, the other
    rounded up (math.ceil) and capped at the target, as LLaVA-NeXT and transformers both do."""
    width, height = image_size
    target_width, target_height = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return target_width, min(math.ceil(height * scale_w), target_height)
    return min(math.ceil(width * scale_h), target_width), target_height


def resize_and_pad(image, target):
    """Resize (BICUBIC, aspect kept) to fit target (width, height) and center it on a black canvas."""
    target_width, target_height = target
    new_width, new_height = fitted_size(image.size, target)
    resized = image.convert("RGB").resize((new_width, new_height), Image.BICUBIC)
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def cut_tiles(image, tile=TILE):
    """Cut an image whose sides are multiples of tile into tile x tile crops, row by row (row-major)."""
    width, height = image.size
    if width % tile or height % tile:
        raise ValueError(f"image size {width}x{height} is not a multiple of the tile size {tile}")
    return [
        image.crop((left, top, left + tile, top + tile))
        for top in range(0, height, tile)
        for left in range(0, width, tile)
    ]


def anyres_views(image, pinpoints, tile=TILE):
    """The views the vision tower sees for a lone image: ([base view, *tiles], grid (cols, rows)).

    The base view is the whole image squashed to tile x tile (no padding, as in training).
    """
    image = image.convert("RGB")
    target = select_best_resolution(image.size, pinpoints)
    tiles = cut_tiles(resize_and_pad(image, target), tile)
    base_view = image.resize((tile, tile), Image.BICUBIC)
    return [base_view] + tiles, (target[0] // tile, target[1] // tile)


def pad_to_square(image, fill=(127, 127, 127)):
    """Center the image on a square canvas of its longer side (LLaVA's expand2square).

    A wide image is pasted at (0, (w - h) // 2), a tall one at ((h - w) // 2, 0). The default fill is the
    SigLIP processor mean, int(0.5 * 255) = 127.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


UNPAD_ROUNDING = {
    "llava-next": int,  # LLaVA-NeXT's llava_arch.unpad_image (training): truncates
    "transformers": lambda x: int(round(x, 7)),  # transformers' unpad_image (the parity tests' oracle)
}


def unpad_crop(height, width, image_size, rounding: str = "llava-next"):
    """Crop bounds (top, bottom, left, right) that cut the padding off a feature map of height x width.

    The map covers the padded canvas; image_size is the original image's (width, height). The kept extent is
    rounded as `rounding` says (UNPAD_ROUNDING): LLaVA-NeXT, which trained the model, truncates with int(x);
    transformers rounds to 7 decimals first. They differ when x lands a hair below an integer: a 49x49 image on a
    1 col x 2 rows grid (54 x 27 map) gives 49 * (27 / 49) = 26.999999999999996, so LLaVA-NeXT keeps 26 rows and
    transformers 28. The padding is removed evenly from both sides, (extent - kept) // 2 each, so an odd
    difference keeps one extra row/column.
    """
    keep = UNPAD_ROUNDING[rounding]
    image_width, image_height = image_size
    if image_width / image_height > width / height:
        kept_height = keep(image_height * (width / image_width))
        padding = (height - kept_height) // 2
        return padding, height - padding, 0, width
    kept_width = keep(image_width * (height / image_height))
    padding = (width - kept_width) // 2
    return 0, height, padding, width - padding


def anyres_grid(image_size, pinpoints, tile=TILE) -> tuple[int, int]:
    """(cols, rows) of tiles of the pinpoint chosen for a lone image."""
    target = select_best_resolution(image_size, pinpoints)
    return target[0] // tile, target[1] // tile


def unpadded_grid_size(image_size, grid, patches_per_side=PATCHES_PER_SIDE, rounding: str = "llava-next"):
    """(feature_rows, feature_cols) of the tile feature grid after unpad_crop, for an image of (width, height)
    tiled as grid (cols, rows). A sliver can keep nothing (384x9 -> (0, 27)): then only the base view remains."""
    cols, rows = grid
    top, bottom, left, right = unpad_crop(rows * patches_per_side, cols * patches_per_side, image_size, rounding)
    return bottom - top, right - left


def anyres_token_count(image_size, pinpoints, tile=TILE, patches_per_side=PATCHES_PER_SIDE,
                       rounding: str = "llava-next"):
    """Visual tokens of a lone image under `trained`: the base view's features (no image_newline after them),
    then the unpadded tile grid with one image_newline at the end of every feature row."""
    rows, cols = unpadded_grid_size(image_size, anyres_grid(image_size, pinpoints, tile), patches_per_side, rounding)
    return patches_per_side * patches_per_side + rows * (cols + 1)


def preprocess(image: Image.Image, size: int = 384) -> np.ndarray:
    """SigLIP processor: BICUBIC squash to size×size, ×1/255, normalise with mean/std 0.5 → [3, size, size] float32."""
    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = (np.asarray(resized, dtype=np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - np.float32(0.5)) / np.float32(0.5)
    return pixels.transpose(2, 0, 1).copy()



@dataclass
class PreparedImage:
    digest: str
    size: tuple[int, int]  # (width, height) of the original
    view: str  # "squash" | "square" | "anyres": how pixels were prepared
    pack: str  # "flat" | "newline" | "anyres": how features are laid into the prompt
    tokens: int
    grid: tuple[int, int] | None = None  # (cols, rows) of anyres tiles
    crop: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) of the tile feature map kept

    @property
    def cache_key(self) -> tuple:
        return (self.digest, self.view, self.pack)

    @property
    def views(self) -> int:
        """Views the vision tower encodes: the base view and the anyres tiles, or the image alone."""
        return 1 + self.grid[0] * self.grid[1] if self.grid else 1


def default_image_mode(config: ModelConfig, has_newline: bool) -> str:
    return "trained" if has_newline and config.wants_newline else "flat"


def check_image_mode(mode: str, has_newline: bool) -> str:
    if mode not in IMAGE_MODES:
        raise UserError(f"image mode must be one of {', '.join(IMAGE_MODES)}, not {mode!r}")
    if mode != "flat" and not has_newline:
        raise UserError(f"image mode {mode!r} needs image_newline, which this checkpoint (a llava-hf port) lacks; "
                        "use 'flat'")
    return mode


def prepare_images(images: list[Image.Image], mode: str, config: ModelConfig, digests=None,
                   has_video: bool = False) -> list[PreparedImage]:
    """Plan every image of a request. `trained` uses anyres only for exactly one image that is not a video frame
    (a one-frame video is still a video: its frame is square-padded, as frames were in training)."""
    patches = config.vision.num_patches
    lone = len(images) == 1 and not has_video
    prepared = []
    for i, image in enumerate(images):
        digest = digests[i] if digests else image_digest(image)
        if mode == "trained" and lone:
            side, rounding = config.vision.patches_per_side, config.unpad_rounding
            grid = anyres_grid(image.size, config.image_grid_pinpoints, config.vision.image_size)
            crop = unpad_crop(grid[1] * side, grid[0] * side, image.size, rounding)
            tokens = anyres_token_count(image.size, config.image_grid_pinpoints, tile=config.vision.image_size,
                                        patches_per_side=side, rounding=rounding)
            prepared.append(PreparedImage(digest, image.size, "anyres", "anyres", tokens, grid, crop))
        elif mode == "trained":
            prepared.append(PreparedImage(digest, image.size, "square", "newline", patches + 1))
        elif mode == "eval":
            prepared.append(PreparedImage(digest, image.size, "squash", "newline", patches + 1))
        else:
            prepared.append(PreparedImage(digest, image.size, "squash", "flat", patches))
    return prepared


def pixel_views(image: Image.Image, plan: PreparedImage, config: ModelConfig) -> np.ndarray:
    """The [V, 3, S, S] pixels the vision tower encodes for one planned image."""
    size = config.vision.image_size
    if plan.view == "anyres":
        views, _ = anyres_views(image, config.image_grid_pinpoints, tile=size)  # the grid planned
        return np.stack([preprocess(v, size) for v in views])
    if plan.view == "square":
        fill = tuple(int(m * 255) for m in PROCESSOR_MEAN)  # (127, 127, 127), as LLaVA's expand2square
        return preprocess(pad_to_square(image, fill), size)[None]
    return preprocess(image, size)[None]

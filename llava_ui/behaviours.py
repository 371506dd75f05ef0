"""How images become visual tokens: the `trained`, `eval` and `flat` behaviours (MODEL_FACTS.md).

Each image of a request becomes a PreparedImage: the pixel views the vision tower sees, how its features are packed,
and how many prompt positions it takes, all known before any compute (the context budget needs the counts).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .anyres import anyres_token_count, anyres_views, pad_to_square, select_best_resolution
from .config import IMAGE_MODES, ModelConfig
from .errors import UserError
from .media import PROCESSOR_MEAN, image_digest, preprocess


@dataclass
class PreparedImage:
    digest: str
    size: tuple[int, int]  # (width, height) of the original
    view: str  # "squash" | "square" | "anyres": how pixels were prepared
    pack: str  # "flat" | "newline" | "anyres": how features are laid into the prompt
    tokens: int
    grid: tuple[int, int] | None = None  # (cols, rows) of anyres tiles
    pixels: np.ndarray | None = None  # [V, 3, S, S], filled only when the features must be computed

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
            tokens = anyres_token_count(image.size, config.image_grid_pinpoints, tile=config.vision.image_size,
                                        patches_per_side=config.vision.patches_per_side)
            target = select_best_resolution(image.size, config.image_grid_pinpoints)
            grid = (target[0] // config.vision.image_size, target[1] // config.vision.image_size)
            prepared.append(PreparedImage(digest, image.size, "anyres", "anyres", tokens, grid))
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

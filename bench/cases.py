"""The benchmark's cases and their synthetic media, identical for the Paddle engine and for transformers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Case:
    name: str
    images: int
    question: str
    new_tokens: int
    video: bool = False  # frames go through the engine's video path (Paddle side); transformers sees images
    follow_up: str = ""  # a second turn on the same images: its time to first token is the figure
    temperature: float = 0.0  # 0: greedy; else sampling at this temperature (top-k and top-p off, as the UI)


CASES = {c.name: c for c in [
    Case("1-image", 1, "What is shown in this picture? Answer briefly.", 32),
    Case("4-images", 4, "What do these four pictures have in common?", 32),
    Case("video-8", 8, "What happens in this video?", 32, video=True),
    Case("video-16", 16, "What happens in this video?", 32, video=True),
    Case("second-turn", 1, "What is shown in this picture? Answer briefly.", 32,
         follow_up="And which colours dominate it?"),
    Case("answer-256", 1, "Tell a long story about this picture.", 256),
    Case("answer-256-t0.2", 1, "Tell a long story about this picture.", 256, temperature=0.2),  # the UI's default
]}
WARM_UP = Case("warm-up", 1, "Hello?", 4)


def picture(seed: int, size=(640, 480)) -> Image.Image:
    """A deterministic picture with structure (gradients, blocks, noise), so resizing does real work."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * rng.uniform(80, 200, 3)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        base[y0:y0 + rng.integers(20, h // 2), x0:x0 + rng.integers(20, w // 2)] = rng.uniform(0, 255, 3)
    noisy = base + rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def frames(count: int, size=(480, 360)) -> list[Image.Image]:
    """A square crossing a gradient: consecutive frames differ a little, as video frames do."""
    w, h = size
    out = []
    for i in range(count):
        canvas = np.asarray(picture(1000, size)).copy()
        x0 = int(i * (w - 80) / max(count - 1, 1))
        canvas[h // 2 - 40:h // 2 + 40, x0:x0 + 80] = (230, 40, 40)
        out.append(Image.fromarray(canvas))
    return out


def media(case: Case) -> list[Image.Image]:
    if case.video:
        return frames(case.images)
    sizes = [(640, 480), (500, 375), (800, 600), (375, 500)]
    return [picture(10 + i, sizes[i % len(sizes)]) for i in range(case.images)]


def warm_up_media() -> list[Image.Image]:
    return [picture(999, (320, 240))]

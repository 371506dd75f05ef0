"""Images and video frames: safe decoding, SigLIP preprocessing, uniform frame sampling."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava_ui.errors import UserError

MAX_IMAGE_PIXELS = 40_000_000  # 40 MP; anything larger is refused before it is decoded (decompression bombs)
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL itself refuses at twice this


@dataclass
class Frame:
    image: Image.Image
    index: int
    timestamp_s: float | None
    digest: str = ""

    def __post_init__(self):
        self.digest = self.digest or image_digest(self.image)


@dataclass
class Video:
    frames: list[Frame]
    total_frames: int
    fps: float | None
    name: str = ""
    digest: str = field(default="")


def image_digest(image: Image.Image) -> str:
    """Content hash of the decoded pixels: the key of the visual-feature cache and the export's input hash."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:16]


def image_size(path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as opened:
            return opened.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise UserError(f"{Path(path).name} is not a readable image ({type(err).__name__})") from None


def load_image(source, name: str = "") -> Image.Image:
    """Path, bytes or PIL image → RGB PIL image, or a UserError saying what is wrong with it."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    label = name or (Path(source).name if isinstance(source, (str, Path)) else "image")
    try:
        opened = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        width, height = opened.size
        if width * height > MAX_IMAGE_PIXELS:
            raise UserError(f"{label} is {width}×{height} pixels; the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels")
        opened.seek(0)  # an animated GIF/PNG/WebP contributes its first frame
        opened.load()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{label}: file not found") from None
    except Image.DecompressionBombError:
        raise UserError(f"{label} is too large to decode safely (over {MAX_IMAGE_PIXELS // 1_000_000} megapixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise UserError(f"{label} is not a readable image ({type(err).__name__})") from None
    return to_rgb(opened)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: PIL's RGB conversion would clip at 255, so scale to 8 bits first
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def frame_indices(total: int, count: int) -> list[int]:
    """`count` frame indices spread evenly from the first to the last frame, rounded down as LLaVA-NeXT's video
    pipeline picks them (`np.linspace(0, total - 1, count, dtype=int)`, playground/demo/video_demo.py); every
    frame once if the clip is shorter (the reference would repeat frames or fail there)."""
    if total <= 0 or count <= 0:
        return []
    if total <= count:
        return list(range(total))
    return [int(i) for i in np.linspace(0, total - 1, count, dtype=int)]


def load_video(path, count: int = 16, name: str = "") -> Video:
    """Sample `count` frames uniformly with OpenCV, seeking to each (an hour-long clip is not decoded in full)."""
    import cv2  # deferred: OpenCV loads only when a video is read

    label = name or Path(path).name
    if count < 1:
        raise UserError("the number of video frames must be at least 1")
    if not Path(path).is_file():
        raise UserError(f"{label}: file not found")
    if _is_still_image(path):
        raise UserError(f"{label} is a still image, not a video: attach it as an image")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise UserError(f"{label} is not a readable video")
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width * height > MAX_IMAGE_PIXELS:  # checked before any frame is decoded, as for images
            raise UserError(f"{label} has frames of {width}×{height} pixels; the limit is "
                            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels")
        fps = capture.get(cv2.CAP_PROP_FPS) or None
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        frames = _read_frames(capture, frame_indices(total, count), fps) if total > 0 else []
    finally:
        capture.release()
    if not frames:  # frame count missing or lying: count the frames, then pick
        frames = _scan_frames(path, count, fps)
    if not frames:
        raise UserError(f"{label} has no readable frames")
    digest = hashlib.sha256("".join(f.digest for f in frames).encode()).hexdigest()[:16]
    return Video(frames=frames, total_frames=max(total, frames[-1].index + 1), fps=fps, name=label, digest=digest)


def _is_still_image(path) -> bool:
    """FFmpeg happily opens a PNG as a one-frame "video"; a still image should be sent as an image instead."""
    try:
        with Image.open(path) as image:
            return not getattr(image, "is_animated", False)
    except Exception:
        return False


def _to_frame(bgr, index: int, fps) -> Frame:
    import cv2  # deferred: as above

    image = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return Frame(image=image, index=index, timestamp_s=round(index / fps, 3) if fps else None)


def _read_frames(capture, indices: list[int], fps) -> list[Frame]:
    import cv2  # deferred: as above

    frames = []
    for index in indices:
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, bgr = capture.read()
        if ok and bgr is not None:
            frames.append(_to_frame(bgr, index, fps))
    return frames


def _scan_frames(path, count: int, fps, limit: int = 200_000) -> list[Frame]:
    """For containers without a usable frame count: count by grabbing (no decoding), then decode only the picks."""
    import cv2  # deferred: as above

    capture = cv2.VideoCapture(str(path))
    total = 0
    while total < limit and capture.grab():
        total += 1
    capture.release()
    wanted = set(frame_indices(total, count))
    frames, capture = [], cv2.VideoCapture(str(path))
    for index in range(total):
        if not capture.grab():
            break
        if index in wanted:
            ok, bgr = capture.retrieve()
            if ok and bgr is not None:
                frames.append(_to_frame(bgr, index, fps))
    capture.release()
    return frames

"""Image decoding and preprocessing, and uniform video frame sampling."""
import io

import numpy as np
import pytest
from PIL import Image

from llava_ui.chat.media import frame_indices, load_image, load_video
from llava_ui.errors import UserError
from llava_ui.model.processing import preprocess


def write_video(path, colours, fps=10, size=(64, 48)):
    """A clip whose frame i is filled with colours[i] (BGR), so sampled frames can be identified."""
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for colour in colours:
        writer.write(np.full((size[1], size[0], 3), colour, dtype=np.uint8))
    writer.release()
    return path


def grey_levels(n):
    return [(int(v),) * 3 for v in np.linspace(0, 250, n)]


def test_preprocess_equals_transformers_siglip_processor():
    transformers = pytest.importorskip("transformers")
    processor = transformers.SiglipImageProcessor(size={"height": 384, "width": 384}, resample=3,
                                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
    rng = np.random.default_rng(0)
    for shape in [(300, 500, 3), (1000, 200, 3), (17, 33, 3)]:
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
        ours = preprocess(image)
        assert ours.shape == (3, 384, 384) and ours.dtype == np.float32
        assert np.abs(ours - theirs).max() < 1e-5


def test_preprocess_squashes_and_normalises_to_minus_one_one():
    white = preprocess(Image.new("RGB", (1000, 10), (255, 255, 255)))
    black = preprocess(Image.new("RGB", (10, 1000), (0, 0, 0)))
    assert np.allclose(white, 1.0) and np.allclose(black, -1.0)


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "L", "LA", "I;16", "1"])
def test_image_modes_become_rgb(mode, tmp_path):
    source = Image.new("RGB", (40, 30), (200, 100, 50))
    image = source.convert(mode) if mode != "I;16" else Image.fromarray(
        np.full((30, 40), 40000, dtype=np.uint16), mode="I;16")
    path = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    if mode == "I;16":  # 16-bit scaled to 8 bits, not clipped to white
        assert 150 < np.asarray(loaded)[0, 0, 0] < 160


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert np.asarray(load_image(path))[0, 0, 0] > 200


@pytest.mark.parametrize("payload,name", [(b"", "empty.png"), (b"\x89PNG\r\n\x1a\n garbage", "corrupt.png"),
                                          (b"just some text\n", "notes.png")])
def test_unreadable_images_are_user_errors(payload, name, tmp_path):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(UserError, match="not a readable image"):
        load_image(path)


def test_decompression_bomb_is_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, format="PNG")  # tiny file, 400 megapixels
    with pytest.raises(UserError, match="megapixels"):
        load_image(buffer.getvalue(), name="bomb.png")


def test_missing_image_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("total,count,expected", [
    (100, 5, [0, 24, 49, 74, 99]), (16, 16, list(range(16))), (5, 16, [0, 1, 2, 3, 4]), (1, 16, [0]),
    (3600 * 30, 4, [0, 35999, 71999, 107999]), (10, 1, [0]), (0, 8, []),
])
def test_frame_indices_are_uniform_first_to_last(total, count, expected):
    assert frame_indices(total, count) == expected


@pytest.mark.parametrize("total,count", [(100, 16), (40, 16), (3600 * 30, 16), (17, 16), (1000, 7)])
def test_frame_indices_are_llava_next_s_rounded_down_linspace(total, count):
    assert frame_indices(total, count) == np.linspace(0, total - 1, count, dtype=int).tolist()


def test_video_frames_sampled_uniformly_with_timestamps(tmp_path):
    levels = grey_levels(40)
    video = load_video(write_video(tmp_path / "clip.mp4", levels, fps=10), count=4)
    assert [f.index for f in video.frames] == [0, 13, 26, 39]
    assert [f.timestamp_s for f in video.frames] == [0.0, 1.3, 2.6, 3.9]
    assert video.total_frames == 40 and video.fps == 10
    for frame in video.frames:  # each picked frame really is that frame (grey level within codec noise)
        assert abs(int(np.asarray(frame.image).mean()) - levels[frame.index][0]) < 8


def test_short_video_gives_each_frame_once(tmp_path):
    video = load_video(write_video(tmp_path / "short.mp4", grey_levels(3)), count=16)
    assert [f.index for f in video.frames] == [0, 1, 2]


def test_one_frame_video(tmp_path):
    video = load_video(write_video(tmp_path / "one.mp4", grey_levels(1)), count=16)
    assert len(video.frames) == 1 and video.frames[0].index == 0


@pytest.mark.parametrize("payload", [b"", b"not a video at all" * 100, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500])
def test_corrupt_or_fake_videos_are_user_errors(payload, tmp_path):
    path = tmp_path / "bad.mp4"
    path.write_bytes(payload)
    with pytest.raises(UserError, match="video|frames"):
        load_video(path, count=8)


def test_long_video_is_not_decoded_in_full(tmp_path, monkeypatch):
    """Sampling seeks to the picked frames: read() is called once per sampled frame, not once per frame."""
    import cv2

    path = write_video(tmp_path / "long.mp4", grey_levels(300), fps=30)
    reads = []
    real = cv2.VideoCapture

    class CountingCapture:
        def __init__(self, *a):
            self.inner = real(*a)

        def read(self):
            reads.append(1)
            return self.inner.read()

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(cv2, "VideoCapture", CountingCapture)
    video = load_video(path, count=8)
    assert len(video.frames) == 8 and len(reads) == 8

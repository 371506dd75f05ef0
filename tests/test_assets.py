"""The example gallery: every listed file exists, opens, and matches its question's image markers."""

import json
from pathlib import Path

import cv2
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
EXAMPLES = json.loads((ASSETS / "examples.json").read_text())
VIDEO_SUFFIXES = {".mp4", ".webm"}


def read_frames(path):
    capture = cv2.VideoCapture(str(path))
    reported = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return reported, frames


def test_examples_have_text_and_files():
    assert len(EXAMPLES) >= 4
    for example in EXAMPLES:
        assert set(example) == {"text", "files"}
        assert example["text"].strip() and example["files"]


def test_some_examples_interleave_and_some_do_not():
    with_markers = [e for e in EXAMPLES if "<image>" in e["text"]]
    assert with_markers and len(with_markers) < len(EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e["files"][0].split("/")[-1])
def test_image_markers_do_not_outnumber_files(example):
    assert example["text"].count("<image>") <= len(example["files"])


@pytest.mark.parametrize("name", sorted({f for e in EXAMPLES for f in e["files"]}))
def test_listed_file_exists_and_opens(name):
    path = ROOT / name
    assert path.is_file(), name
    if path.suffix in VIDEO_SUFFIXES:
        reported, frames = read_frames(path)
        assert reported > 0 and len(frames) == reported
        height, width = frames[0].shape[:2]
        assert width <= 320 and height <= 240
    else:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.convert("RGB").size[0] > 0
        assert path.stat().st_size <= 100_000


def test_mp4_video_reads_back_with_its_frame_count():
    reported, frames = read_frames(ASSETS / "ball_red_to_blue.mp4")
    assert reported == len(frames) == 40
    capture = cv2.VideoCapture(str(ASSETS / "ball_red_to_blue.mp4"))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(10)
    capture.release()
    # the ball is red (BGR: high R) early on and blue late
    first, last = frames[2], frames[-3]
    assert ((first[:, :, 2] > 180) & (first[:, :, 0] < 90)).sum() > 200
    assert ((last[:, :, 0] > 180) & (last[:, :, 2] < 90)).sum() > 200


def test_assets_stay_small():
    total = sum(p.stat().st_size for p in ASSETS.iterdir() if p.is_file())
    assert total < 1_000_000

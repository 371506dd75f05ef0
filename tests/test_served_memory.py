"""The served path at the real dimensions (slow): the server's peak memory for 8 and 16 video frames, through /v1
and through the web chat's handlers, stays within 0.5 GB of the command line doing the same work, and ten
requests in a row grow nothing but the bounded caches. The same code as `bench/served.py`, which reports the
figures; this asserts them.
"""
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import served  # noqa: E402

NEW_TOKENS = 8
SLACK_BYTES = 0.5 * 2**30


@pytest.fixture(scope="module")
def model(real_checkpoint):
    return real_checkpoint  # conftest: LLAVA_UI_REAL_CHECKPOINT, else the benchmark's real-size checkpoint


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [served.write_clip(folder / f"clip{seed}.mp4", seed) for seed in (0, 1)], folder


@pytest.mark.parametrize("frames", [8, 16])
def test_the_server_peak_stays_within_half_a_gigabyte_of_the_command_line(model, clips, frames, tmp_path):
    (clip, _), folder = clips[0], clips[1]
    images = served.frame_files(clip, frames, folder / "frames")
    cli_images = served.cli(model, [a for f in images for a in ("--image", str(f))] + [
        "--prompt", served.QUESTION, "--max-new-tokens", str(NEW_TOKENS)])
    cli_video = served.cli(model, ["--video", str(clip), "--frames", str(frames), "--prompt", served.QUESTION,
                                   "--max-new-tokens", str(NEW_TOKENS)])
    with served.server(model, tmp_path / "api.log") as (url, pid):  # a fresh server per path: no cache of the other
        api = served.api_request(url, pid, images, served.QUESTION, NEW_TOKENS)
    with served.server(model, tmp_path / "chat.log") as (url, pid):
        chat = served.chat_request(url, pid, [clip], frames, served.QUESTION, NEW_TOKENS)
    print(f"\n{frames} frames: API peak {served.gb(api['peak_rss'])} GB vs CLI {served.gb(cli_images['peak_rss'])} GB;"
          f" chat peak {served.gb(chat['peak_rss'])} GB vs CLI {served.gb(cli_video['peak_rss'])} GB")
    # the same images; the API's text part comes before them (the CLI puts them first, then a newline)
    assert api["stats"]["visual_tokens"] == cli_images["stats"]["visual_tokens"]
    assert abs(api["stats"]["prompt_tokens"] - cli_images["stats"]["prompt_tokens"]) <= 2
    assert api["peak_rss"] <= cli_images["peak_rss"] + SLACK_BYTES
    assert chat["peak_rss"] <= cli_video["peak_rss"] + SLACK_BYTES


def test_ten_requests_in_a_row_grow_nothing_but_the_bounded_caches(model, clips, tmp_path):
    (clip_a, clip_b), folder = clips
    sets = [served.frame_files(clip, 8, folder / "frames") for clip in (clip_a, clip_b)]
    rows = []
    with served.server(model, tmp_path / "server.log") as (url, pid):
        for i in range(10):
            result = served.api_request(url, pid, sets[i % 2], f"{served.QUESTION} (question {i + 1})", 2)
            caches = served.caches(url)
            rows.append((result["rss_after"], caches["feature_bytes"] + caches["prefix_bytes"]))
    print("\n" + "\n".join(f"request {i + 1}: RSS {served.gb(rss)} GB, caches {cached / 2**20:.0f} MB"
                           for i, (rss, cached) in enumerate(rows)))
    (rss_2, cached_2), cached_last = rows[1], rows[-1][1]
    # after both clips were seen once, the resident size moves with the caches and little else
    assert max(rss for rss, _ in rows[1:]) - rss_2 <= (cached_last - cached_2) + 0.25 * 2**30

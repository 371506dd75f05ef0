"""`python -m llava_ui generate`: the command-line contract other checks rely on."""
import json
import subprocess
import sys

import pytest

from llava_ui.commands.main import main

ASSETS = ["assets/shapes_before.png", "assets/shapes_after.png"]


def run(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_record_and_streamed_text(tiny_dir, capsys):
    code, out, err = run(capsys, "--model", str(tiny_dir), "--image", ASSETS[0], "--image", ASSETS[1],
                         "--prompt", "What changed between <image> and <image>?", "--max-new-tokens", "12",
                         "--temperature", "0", "--json")
    assert code == 0
    lines = out.rstrip("\n").split("\n")
    record = json.loads(lines[-1])
    assert "\n".join(lines[:-1]) == record["text"]  # the streamed answer, then the JSON object
    assert len(record["token_ids"]) == record["stats"]["generated_tokens"] == 12
    assert record["prompt_tokens"] == record["stats"]["prompt_tokens"]
    assert record["visual_tokens_per_image"] == [730, 730]  # trained mode, two images: square-padded + newline
    for key in ("ttft_s", "decode_tokens_per_s", "generated_tokens"):
        assert record["stats"][key] is not None
    assert record["random_weights"] is True


def test_greedy_is_repeatable_and_seeded_sampling_too(tiny_dir, capsys):
    base = ["--model", str(tiny_dir), "--image", ASSETS[0], "--prompt", "Describe it.", "--max-new-tokens", "8",
            "--json"]
    greedy = [json.loads(run(capsys, *base, "--temperature", "0")[1].splitlines()[-1]) for _ in range(2)]
    assert greedy[0]["token_ids"] == greedy[1]["token_ids"]
    sampled = [json.loads(run(capsys, *base, "--temperature", "1", "--seed", "5")[1].splitlines()[-1])
               for _ in range(2)]
    assert sampled[0]["token_ids"] == sampled[1]["token_ids"] and sampled[0]["seed"] == 5


def test_video_frames_are_reported(tiny_dir, capsys):
    code, out, _ = run(capsys, "--model", str(tiny_dir), "--video", "assets/ball_red_to_blue.mp4", "--frames", "4",
                       "--prompt", "What happens?", "--max-new-tokens", "4", "--temperature", "0", "--json")
    record = json.loads(out.splitlines()[-1])
    assert code == 0 and [f["index"] for f in record["frames"]] == [0, 13, 26, 39]
    assert len(record["visual_tokens_per_image"]) == 4


@pytest.mark.parametrize("extra,message", [
    (["--image", "missing.png"], "not found"),
    (["--image", "requirements.txt"], "not a readable image"),
    (["--video", "assets/shapes_before.png"], "video"),
    (["--image", ASSETS[0], "--image", ASSETS[1], "--context-length", "1000"], "context holds 1,000 and the text takes 53: there is room for at most 1 image or frame"),
    (["--image", ASSETS[0], "--prompt", "two <image> <image>"], "marker"),
])
def test_user_errors_exit_2_with_one_line(tiny_dir, capsys, extra, message):
    args = ["--model", str(tiny_dir), "--prompt", "hi", *extra]
    code, out, err = run(capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0]
    assert err.rstrip("\n").endswith(errors[0])  # one line, the last thing said


def test_module_entry_point_streams_and_reports_progress_on_stderr(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "llava_ui", "generate", "--model", str(tiny_dir), "--prompt", "Hi",
                           "--max-new-tokens", "5", "--temperature", "0", "--json"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["stats"]["generated_tokens"] == 5
    assert "reading paddlenlp weights" in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "llava_ui", "generate", "--model", str(tiny_dir), "--prompt",
                              "Hi", "--image", "nope.png"], capture_output=True, text=True, timeout=180)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == "error: nope.png: file not found"

"""What the research inspector's views cost (issue 36): decode speed with token probabilities off and on (the fast
path unchanged when nothing is asked, not measurably slower when they are), then per kind of prompt the time and
memory an answer takes with the attention pass, the image-effect pass or both on top of the same answer without
them, and the time to draw the heat maps and shares from the attention.

    .venv/bin/python bench/inspector_cost.py                      # the real-size random checkpoint, fp32
    .venv/bin/python bench/inspector_cost.py --model DIR --rounds 3 --cases one-image

One process, one engine. Decode speed: the same greedy answer (one picture + a question) with logprobs off, K = 5
and K = 20 in turn, `--rounds` times, so that drifts of a shared machine hit every setting alike. Views: each case's
prompt is answered once to fill the feature and prefix caches, then plain and with each view; the extra time and the
peak resident memory above the resident size before the answer (VmHWM reset through /proc/self/clear_refs) are the
view's. Writes bench/results/<name>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from run import DEFAULT_CHECKPOINTS, cpu_model, ensure_checkpoints  # noqa: E402

SETTINGS = {"off": None, "K=5": 5, "K=20": 20}
PICTURE = ROOT / "assets" / "shapes_before.png"
# case → (image mode, pictures, video frames, views measured)
CASES = {"one-image": ("flat", [PICTURE], 0, ("attention", "image_effect", "both")),
         "anyres": ("trained", [PICTURE], 0, ("attention", "image_effect")),
         "frames": ("trained", [], 8, ("attention", "image_effect"))}
VIEWS = {"attention": dict(attention=True), "image_effect": dict(image_effect=True),
         "both": dict(attention=True, image_effect=True)}


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measured(fn):
    """(fn's result, seconds, peak resident GB above the resident size before it)."""
    before = memory_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began, (memory_kb("VmHWM") - before) / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint folder (default: the bench's real one)")
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--name", default="inspector-cost")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    from llava_ui.engine import Engine

    model = args.model or ensure_checkpoints(args.checkpoints)["paddle"]
    engine = Engine(str(model), dtype=args.dtype, image_mode="flat", batch_slots=1).load()  # one stream, as
    # the command line runs
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_model(), "model": str(model), "dtype": args.dtype, "tokens": args.tokens,
              "precision": engine.status().get("precision"), "resident_after_load_gb": memory_kb("VmRSS") / 1e6}
    record.update(decode_speeds(engine, args))
    record["cases"] = {name: view_costs(engine, name, args) for name in args.cases.split(",")}
    lines = report(record, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def answer(engine, case: str, tokens: int, **views):
    from llava_ui.chat.conversation import Conversation
    from llava_ui.config import GenerationSettings

    mode, pictures, frames, _ = CASES[case]
    conversation = Conversation()
    video = str(ROOT / "assets" / "traffic_light.webm") if frames else None
    conversation.add_user_files("Describe what you see.", [str(p) for p in pictures], video, frames)
    result = engine.generate(conversation, GenerationSettings(max_new_tokens=tokens, temperature=0, **views),
                             image_mode=mode)
    if len(result.token_ids) != tokens:  # greedy: every setting of the case stops at the same token
        print(f"note: the {case} answer stopped at {len(result.token_ids)} tokens", file=sys.stderr)
    return result


def decode_speeds(engine, args) -> dict:
    answer(engine, "one-image", args.tokens)  # warm-up
    speeds = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, k in SETTINGS.items():
            speeds[name].append(answer(engine, "one-image", args.tokens, logprobs=k).stats.decode_tokens_per_s)
    return {"decode_tokens_per_s": speeds, "median": {name: statistics.median(v) for name, v in speeds.items()}}


def view_costs(engine, case: str, args) -> dict:
    """The case's answer plain and with each view (caches warm), and the time to draw the views."""
    first, first_s, _ = measured(lambda: answer(engine, case, args.tokens))
    _, plain_s, plain_gb = measured(lambda: answer(engine, case, args.tokens))
    costs = {"prompt_tokens": first.stats.prompt_tokens, "generated_tokens": len(first.token_ids),
             "first_answer_s": first_s, "plain_s": plain_s,
             "plain_peak_gb": plain_gb, "views": {}}
    for view in CASES[case][3]:
        result, seconds, peak = measured(lambda: answer(engine, case, args.tokens, **VIEWS[view]))
        costs["views"][view] = {"s": seconds, "extra_s": seconds - plain_s, "peak_gb": peak}
        if result.attention is not None:
            costs["drawing"] = drawing_times(engine, case, result)
    return costs


def drawing_times(engine, case: str, result) -> dict:
    """Seconds to turn Result.attention into arrays, and to draw the maps and shares for the whole answer over
    every layer and for one token in one layer (what the inspector does on each choice)."""
    from PIL import Image

    from llava_ui.model.processing import prepare_images
    from llava_ui.web.looked import WHOLE, AnsweredImages, attention_by_image, look, selected, shares_html

    mode, pictures, frames, _ = CASES[case]
    began = time.perf_counter()
    arrays = attention_by_image(result.attention)
    to_arrays = time.perf_counter() - began
    if frames:
        from llava_ui.chat.media import load_video

        shown = [f.image for f in load_video(str(ROOT / "assets" / "traffic_light.webm"), frames).frames]
    else:
        shown = [Image.open(p).convert("RGB") for p in pictures]
    images = AnsweredImages(shown, prepare_images(shown, mode, engine.config, has_video=bool(frames)),
                            [f"image {i}" for i in range(1, len(shown) + 1)])
    layers = arrays[0].shape[1]
    times = {"to_arrays_s": to_arrays}
    for name, (token, lo, hi) in {"whole_answer_all_layers_s": (WHOLE, 1, layers), "one_token_one_layer_s":
                                  ("0", layers // 2, layers // 2)}.items():
        began = time.perf_counter()
        shares_html(look(selected(arrays, token, lo, hi), images), images.labels)
        times[name] = time.perf_counter() - began
    return times


def report(record: dict, args) -> list[str]:
    lines = [f"# Inspector views: cost ({record['cpu']}, {record['precision']}, {args.tokens} tokens, "
             f"{args.rounds} rounds)", "", f"Measured {record['date']}; resident after load "
             f"{record['resident_after_load_gb']:.2f} GB.", "",
             "| logprobs | median decode tokens/s | vs off | every round |", "|---|---|---|---|"]
    medians = record["median"]
    for name, values in record["decode_tokens_per_s"].items():
        lines.append(f"| {name} | {medians[name]:.2f} | {medians[name] / medians['off']:.3f} | "
                     f"{', '.join(f'{v:.2f}' for v in values)} |")
    lines += ["", "Per case, the same greedy answer with the feature and prefix caches warm: plain, then with each "
              "view. Peak: resident memory above the resident size before the answer.", "",
              "| case | prompt tokens | answer | view | with the view | extra time | peak above resident |",
              "|---|---:|---:|---|---:|---:|---:|"]
    for case, costs in record["cases"].items():
        lines.append(f"| {case} ({costs['generated_tokens']} tokens) | {costs['prompt_tokens']:,} | "
                     f"{costs['plain_s']:.2f} s | (none) | | | "
                     f"{costs['plain_peak_gb']:.2f} GB |")
        for view, cost in costs["views"].items():
            lines.append(f"| | | | {view} | {cost['s']:.2f} s | {cost['extra_s']:+.2f} s | "
                         f"{max(cost['peak_gb'], 0):.2f} GB |")
    lines += ["", "Drawing the views from an answer's attention (the inspector's work on each choice):", "",
              "| case | rows to arrays | whole answer, all layers | one token, one layer |", "|---|---:|---:|---:|"]
    for case, costs in record["cases"].items():
        if "drawing" in costs:
            d = costs["drawing"]
            lines.append(f"| {case} | {d['to_arrays_s']:.3f} s | {d['whole_answer_all_layers_s']:.3f} s | "
                         f"{d['one_token_one_layer_s']:.3f} s |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())

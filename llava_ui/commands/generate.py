"""`generate`: answer one prompt with images or a video; the answer streams to stdout, progress bars to stderr."""
from __future__ import annotations

import json
import sys
from dataclasses import replace

from llava_ui.backends.base import Delta, Progress, TopLogprob
from llava_ui.commands.common import (HelpFormatter, ProgressBars, add_frames_argument, add_log_level,
                                      add_model_arguments, add_sampling_arguments, conversation_from_files,
                                      make_backend, settings_from)
from llava_ui.config import MAX_LOGPROBS


def add_generate_command(sub) -> None:
    gen = sub.add_parser("generate", help="answer one prompt with images or a video",
                         formatter_class=HelpFormatter)
    add_model_arguments(gen)
    add_log_level(gen)
    gen.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    gen.add_argument("--video", default=None, help="a video file (frames are sampled uniformly)")
    add_frames_argument(gen)
    gen.add_argument("--prompt", required=True,
                     help="the question; <image> markers place the images, otherwise they come first")
    gen.add_argument("--system", default=None, help="system prompt (default: You are a helpful assistant.)")
    add_sampling_arguments(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object with ids and stats on the last line")
    gen.add_argument("--logprobs", type=int, default=None, metavar="K",
                     help="with --json: each generated token's log-probability and its K likeliest alternatives "
                          f"(0 to {MAX_LOGPROBS})")
    gen.add_argument("--attention", action="store_true",
                     help="with --json: each generated token's attention over each image's visual positions, per "
                          "layer, averaged over heads (one more pass over prompt + answer after the answer)")
    gen.add_argument("--image-effect", action="store_true",
                     help="with --json: each generated token's log-probability with the images minus without them "
                          "(the answer read once more, teacher-forced, with the images left out of the prompt)")
    gen.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    bars = ProgressBars("frame" if args.video else "image")
    backend = make_backend(args, on_progress=bars.load, batch_slots=1)  # one request: nothing to batch
    frames = args.frames
    if args.video and frames is None:  # the default follows this machine's speed: load first
        backend.load()
        frames = backend.default_frames()
        print(f"sampling {frames} frames (the default here; --frames N to choose)", file=sys.stderr, flush=True)
    conversation = conversation_from_files(args.prompt, args.image, args.video, frames or 16, args.system)
    backend.load()
    final = None
    settings = replace(settings_from(args), logprobs=args.logprobs, attention=args.attention,
                       image_effect=args.image_effect).validate()
    for event in backend.stream(conversation, settings, image_mode=args.image_mode):
        if isinstance(event, Progress):
            bars.event(event)
            continue
        bars.close()
        if isinstance(event, Delta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        else:
            final = event
    sys.stdout.write("\n")
    if args.json:
        video = conversation.turns[-1].video
        result = final.to_dict()
        record = {
            **{key: result[key] for key in ("text", "token_ids", "finish_reason", "seed", "image_mode",
                                            "visual_tokens_per_image", "stats")},
            "prompt_tokens": final.stats.prompt_tokens, "model": backend.status()["model"], "random_weights": backend.status().get("random_weights", False),
            "frames": [{"index": f.index, "timestamp_s": f.timestamp_s} for f in video.frames] if video else [],
        }
        if final.logprobs is not None:
            record["logprobs"] = [{**_scored(t), "top": [_scored(alt) for alt in t.top]} for t in final.logprobs]
        if final.attention is not None:
            record["attention"] = final.attention
        if final.image_effect is not None:
            record["image_effect"] = final.image_effect
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    return 0


def _scored(token: TopLogprob) -> dict:
    return {"token_id": token.token_id, "token": token.token, "logprob": token.logprob}

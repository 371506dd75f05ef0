"""Command line: `python -m llava_ui generate|eval|random-checkpoint|replay ...`.

Answers stream to stdout; progress goes to stderr; a user error exits with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import json
import sys

from llava_ui import DEFAULT_MODEL
from llava_ui.config import IMAGE_MODES, GenerationSettings
from llava_ui.errors import UserError


def add_model_arguments(parser: argparse.ArgumentParser, image_mode: bool = True) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"checkpoint folder, hub id, or tiny-random (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None, help="cpu, gpu or gpu:N (default: gpu when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16/float16 on GPU, float32 on CPU")
    if image_mode:
        parser.add_argument("--image-mode", default=None, choices=IMAGE_MODES,
                            help="how images become visual tokens (default: trained when the checkpoint allows, "
                                 "else flat)")
    parser.add_argument("--context-length", type=int, default=None, help="cap the context (default: the model's)")
    parser.add_argument("--backend", default="local", choices=["local", "remote"],
                        help="local Paddle model, or a remote OpenAI-compatible engine (see --base-url)")
    parser.add_argument("--base-url", default=None, help="remote engine URL, e.g. http://host:8000/v1")
    parser.add_argument("--remote-model", default=None, help="model name on the remote engine")
    parser.add_argument("--remote-api-key", default=None, help="API key for the remote engine")


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float = 0.2) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def settings_from(args) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def make_backend(args):
    if getattr(args, "backend", "local") == "remote":
        from llava_ui.backends.remote import RemoteEngine

        if not args.base_url:
            raise UserError("--backend remote needs --base-url")
        return RemoteEngine(args.base_url, args.remote_model, api_key=args.remote_api_key)
    from llava_ui.backends.local import get_engine

    engine = get_engine(args.model, device=args.device, dtype=args.dtype, image_mode=getattr(args, "image_mode", None),
                        context_length=args.context_length)
    engine.on_progress = ProgressBars().load
    return engine


class ProgressBars:
    """tqdm bars on stderr: loading the weights, encoding the images or frames, reading the prompt. Steps
    without a count print as lines."""

    def __init__(self, unit: str = "image"):
        self.unit = unit
        self.bar = None
        self.label = None

    def load(self, message: str, done: int | None = None, total: int | None = None) -> None:
        if done is None:
            self.close()
            print(message, file=sys.stderr, flush=True)
        else:
            self._show(message, done, total, "weight")

    def event(self, event: dict) -> None:
        """An engine progress event."""
        if event["stage"] == "vision":
            self._show(f"encoding {self.unit}s", event["done"], event["total"], self.unit, event.get("eta_s"))
        else:
            self._show("reading the prompt", event["done"], event["total"], "tok", event.get("eta_s"))

    def _show(self, label: str, done: int, total: int, unit: str, eta_s: float | None = None) -> None:
        from tqdm import tqdm  # deferred: only the command line draws bars

        if label != self.label:
            self.close()
            self.bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)
            self.label = label
        self.bar.n = done
        if eta_s is not None:
            self.bar.set_postfix_str(f"first token in ~{eta_s:.0f} s", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.bar.total or self.bar.n
            self.bar.close()
        self.bar = self.label = None


def build_conversation(prompt: str, images, video, frames: int, system=None):
    from llava_ui.chat.conversation import Conversation
    from llava_ui.chat.media import load_image, load_video

    conversation = Conversation(system=system)
    pictures = [load_image(path) for path in images or []]
    clip = load_video(video, frames) if video else None
    conversation.add_user(prompt, pictures, clip)
    return conversation


def cmd_generate(args) -> int:
    backend = make_backend(args)
    frames = args.frames
    if args.video and frames is None:  # the default follows this machine's speed: load first
        backend.load()
        frames = backend.default_frames()
        print(f"sampling {frames} frames (the default here; --frames N to choose)", file=sys.stderr, flush=True)
    conversation = build_conversation(args.prompt, args.image, args.video, frames or 16, args.system)
    backend.load()
    final = None
    bars = ProgressBars("frame" if args.video else "image")
    for event in backend.stream(conversation, settings_from(args), image_mode=args.image_mode):
        if event["type"] == "progress":
            bars.event(event)
            continue
        bars.close()
        if event["type"] == "delta":
            sys.stdout.write(event["text"])
            sys.stdout.flush()
        else:
            final = event
    sys.stdout.write("\n")
    if args.json:
        video = conversation.turns[-1].video
        record = {
            "text": final["text"], "token_ids": final["token_ids"], "prompt_tokens": final["stats"]["prompt_tokens"],
            "finish_reason": final["finish_reason"], "seed": final["seed"], "image_mode": final["image_mode"],
            "visual_tokens_per_image": final["visual_tokens_per_image"], "stats": final["stats"],
            "model": backend.status()["model"], "random_weights": backend.status().get("random_weights", False),
            "frames": [{"index": f.index, "timestamp_s": f.timestamp_s} for f in video.frames] if video else [],
        }
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_ui",
                                     description="LLaVA-NeXT-Interleave on PaddlePaddle: generate, evaluate, test models")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one prompt with images or a video")
    add_model_arguments(gen)
    gen.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    gen.add_argument("--video", default=None, help="a video file (frames are sampled uniformly)")
    gen.add_argument("--frames", type=int, default=None,
                     help="video frames to sample (default: 16 on a GPU; on a CPU as many, up to 16, as give the "
                          "first token within about a minute at this machine's measured speed)")
    gen.add_argument("--prompt", required=True,
                     help="the question; <image> markers place the images, otherwise they come first")
    gen.add_argument("--system", default=None, help="system prompt (default: You are a helpful assistant.)")
    add_sampling_arguments(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object with ids and stats on the last line")
    gen.set_defaults(func=cmd_generate)

    from llava_ui.eval.answerers import add_eval_command
    from llava_ui.chat.export import add_replay_command

    add_eval_command(sub)
    add_replay_command(sub)

    rnd = sub.add_parser("random-checkpoint", help="write a random-weight checkpoint (tests, offline demos)")
    rnd.add_argument("args", nargs=argparse.REMAINDER)
    rnd.set_defaults(func=lambda a: _random_checkpoint(a.args))
    return parser


def _random_checkpoint(argv) -> int:
    from llava_ui.checkpoints.random import main

    main(argv)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

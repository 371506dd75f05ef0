"""Command line: `python -m llava_ui generate|eval|random-checkpoint|replay ...`.

Answers stream to stdout; progress goes to stderr; a user error exits with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import DEFAULT_MODEL
from .config import IMAGE_MODES, GenerationSettings
from .errors import UserError


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
        from .remote import RemoteEngine

        if not args.base_url:
            raise UserError("--backend remote needs --base-url")
        return RemoteEngine(args.base_url, args.remote_model, api_key=args.remote_api_key)
    from .engine import get_engine

    engine = get_engine(args.model, device=args.device, dtype=args.dtype, image_mode=getattr(args, "image_mode", None),
                        context_length=args.context_length)
    engine.on_progress = lambda message: print(message, file=sys.stderr, flush=True)
    return engine


def build_conversation(prompt: str, images, video, frames: int, system=None):
    from .conversation import Conversation
    from .media import load_image, load_video

    conversation = Conversation(system=system)
    pictures = [load_image(path) for path in images or []]
    clip = load_video(video, frames) if video else None
    conversation.add_user(prompt, pictures, clip)
    return conversation


def cmd_generate(args) -> int:
    conversation = build_conversation(args.prompt, args.image, args.video, args.frames, args.system)
    backend = make_backend(args)
    backend.load()
    final = None
    for event in backend.stream(conversation, settings_from(args), image_mode=args.image_mode):
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
    gen.add_argument("--frames", type=int, default=16, help="video frames to sample (default 16)")
    gen.add_argument("--prompt", required=True,
                     help="the question; <image> markers place the images, otherwise they come first")
    gen.add_argument("--system", default=None, help="system prompt (default: You are a helpful assistant.)")
    add_sampling_arguments(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object with ids and stats on the last line")
    gen.set_defaults(func=cmd_generate)

    from .evaluation_cli import add_eval_command
    from .replay import add_replay_command

    add_eval_command(sub)
    add_replay_command(sub)

    rnd = sub.add_parser("random-checkpoint", help="write a random-weight checkpoint (tests, offline demos)")
    rnd.add_argument("args", nargs=argparse.REMAINDER)
    rnd.set_defaults(func=lambda a: _random_checkpoint(a.args))
    return parser


def _random_checkpoint(argv) -> int:
    from .random_checkpoint import main

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

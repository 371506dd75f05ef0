"""What every command shares: the model and backend flags (defined once), the sampling flags, building the
backend, a conversation from files and the generation settings from flag values."""
from __future__ import annotations

import argparse
import os
import sys

from llava_ui import DEFAULT_MODEL
from llava_ui.backends.base import Progress
from llava_ui.chat.conversation import Conversation
from llava_ui.config import IMAGE_MODES, GenerationSettings
from llava_ui.errors import UserError


def env(name: str, default=None):
    """LLAVA_<NAME> from the environment (a Space is configured on its settings page)."""
    return os.environ.get(f"LLAVA_{name}", default)


def add_model_arguments(parser: argparse.ArgumentParser, image_mode: bool = True, from_env: bool = False) -> None:
    """--model, --device, --dtype, --image-mode, --context-length and the remote-backend flags; with `from_env`,
    each default reads LLAVA_<FLAG> (the server)."""
    default = env if from_env else (lambda name, value=None: value)
    parser.add_argument("--model", default=default("MODEL", DEFAULT_MODEL),
                        help=f"checkpoint folder, hub id, or tiny-random (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default=default("DEVICE"), help="cpu, gpu or gpu:N (default: gpu when available)")
    parser.add_argument("--dtype", default=default("DTYPE"), choices=[None, "float32", "float16", "bfloat16"],
                        help="default: bfloat16/float16 on GPU, float32 on CPU")
    if image_mode:
        parser.add_argument("--image-mode", default=default("IMAGE_MODE"), choices=[None, *IMAGE_MODES],
                            help="how images become visual tokens (default: trained when the checkpoint allows, "
                                 "else flat)")
    context = default("CONTEXT_LENGTH")
    parser.add_argument("--context-length", type=int, default=int(context) if context else None,
                        help="cap the context (default: the model's)")
    parser.add_argument("--backend", default=default("BACKEND", "local"), choices=["local", "remote"],
                        help="local Paddle model, or a remote OpenAI-compatible engine (see --base-url)")
    parser.add_argument("--base-url", default=default("BASE_URL"), help="remote engine URL, e.g. http://host:8000/v1")
    parser.add_argument("--remote-model", default=default("REMOTE_MODEL"), help="model name on the remote engine")
    parser.add_argument("--remote-api-key", default=default("REMOTE_API_KEY"), help="API key for the remote engine")


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float = 0.2) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def settings_from(args) -> GenerationSettings:
    return GenerationSettings.from_inputs(args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                                          args.max_new_tokens, args.seed)


def make_backend(args, on_progress=None):
    """The backend the flags ask for: the process-wide local engine, or a remote one. Loading progress goes to
    `on_progress(message, done, total)`, by default progress bars on stderr."""
    if getattr(args, "backend", "local") == "remote":
        from llava_ui.backends.remote import RemoteEngine  # deferred: a local run never needs httpx's client

        if not args.base_url:
            raise UserError("--backend remote needs --base-url")
        return RemoteEngine(args.base_url, args.remote_model, api_key=args.remote_api_key)
    from llava_ui.backends.local import get_engine  # deferred: a remote front end starts without Paddle

    engine = get_engine(args.model, device=args.device, dtype=args.dtype, image_mode=getattr(args, "image_mode", None),
                        context_length=args.context_length)
    engine.on_progress = on_progress or ProgressBars().load
    return engine


def conversation_from_files(text: str, image_paths=(), video_path=None, frames: int = 16,
                            system: str | None = None) -> Conversation:
    """One user message from files on disk."""
    conversation = Conversation(system=system)
    conversation.add_user_files(text, image_paths or [], video_path, frames)
    return conversation


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

    def event(self, event: Progress) -> None:
        if event.stage == "vision":
            self._show(f"encoding {self.unit}s", event.done, event.total, self.unit, event.eta_s)
        else:
            self._show("reading the prompt", event.done, event.total, "tok", event.eta_s)

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

"""What every command shares: the model and backend flags (defined once), the sampling flags, building the
backend, a conversation from files and the generation settings from flag values."""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import warnings

from llava_ui import DEFAULT_MODEL, __version__
from llava_ui.backends.base import Progress
from llava_ui.chat.conversation import Conversation
from llava_ui.config import IMAGE_MODES, GenerationSettings
from llava_ui.errors import UserError

LOG_LEVELS = ("debug", "info", "warning", "error")
HUBS = ("hf", "paddlenlp")


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env(name: str, default=None):
    """LLAVA_<NAME> from the environment (a Space is configured on its settings page); unset or empty: default."""
    value = os.environ.get(f"LLAVA_{name}", "")
    return value if value.strip() else default


def parse_bool(text: str, name: str) -> bool:
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise SystemExit(f"error: {name}={text!r} is not a boolean (use 1/0, true/false or yes/no)")


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each flag's default and its LLAVA_<NAME> variable."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        default = action.default
        if "default" not in help_text and default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            help_text += " (default: %(default)s)"
        variable = getattr(action, "env_name", None)
        return f"{help_text} [{variable}]" if variable else help_text


def option(parser, *flags: str, env_name: str | None = None, default=None, type=str, choices=None, help: str,
           **kwargs):
    """One flag and its LLAVA_<env_name> variable (one definition for the app, the API and every command): the
    variable, when set, replaces the default; a flag on the command line wins over both."""
    if env_name and env(env_name) is not None:
        raw = env(env_name)
        try:
            default = type(raw)
        except ValueError:
            raise SystemExit(f"error: LLAVA_{env_name}={raw!r} is not a valid {flags[0]} value") from None
        if choices and default not in choices:
            raise SystemExit(f"error: LLAVA_{env_name}={raw!r} must be one of {', '.join(map(str, choices))}")
    action = parser.add_argument(*flags, default=default, type=type, choices=choices, help=help, **kwargs)
    action.env_name = f"LLAVA_{env_name}" if env_name else None
    return action


def switch(parser, flag: str, env_name: str | None, default: bool, help: str):
    """--flag / --no-flag, defaulting to LLAVA_<env_name> (1/0, true/false, yes/no) when it is set."""
    if env_name and env(env_name) is not None:
        default = parse_bool(env(env_name), f"LLAVA_{env_name}")
    action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                 help=f"{help} (default: {'on' if default else 'off'})")
    action.env_name = f"LLAVA_{env_name}" if env_name else None
    return action


def add_log_level(parser: argparse.ArgumentParser) -> None:
    option(parser, "--log-level", env_name="LOG_LEVEL", default="info", type=str.lower, choices=LOG_LEVELS,
           help="what this project logs to stderr (other libraries log warnings and errors only)")


def configure_logging(level: str) -> None:
    """The one logging setup of the app, the API and every command: this project's loggers at `level` on stderr,
    other libraries at warning; Paddle's and paddlenlp's import-time notices filtered (the user sees only ours)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("llava_ui").setLevel(level.upper())
    warnings.filterwarnings("ignore", message="No ccache found")
    warnings.filterwarnings("ignore", message=".*distutils.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="(?s).*is deprecated since")
    for name in ("PaddleNLP", "datasets"):  # paddlenlp resets its logger's level on import; a filter stays
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.WARNING)


def version_line() -> str:
    def installed(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{name} {installed(name)}" for name in ("paddlepaddle", "paddlenlp", "gradio"))
    return f"llava-ui {__version__} ({deps})"


def add_model_arguments(parser: argparse.ArgumentParser, image_mode: bool = True) -> None:
    """--model, --hub, --device, --dtype, --image-mode, --context-length and the remote-backend flags."""
    option(parser, "--model", env_name="MODEL", default=DEFAULT_MODEL,
           help="a checkpoint folder, a model id (hf:<id> for the Hugging Face Hub) or tiny-random")
    option(parser, "--hub", env_name="HUB", default=None, choices=HUBS,
           help="where a model id is downloaded from (default: hf on a Hugging Face Space, else paddlenlp, "
                "PaddleNLP's community storage)")
    option(parser, "--device", env_name="DEVICE", help="cpu, gpu or gpu:N; cuda, cuda:N too (default: gpu when Paddle has CUDA)")
    option(parser, "--dtype", env_name="DTYPE", choices=["float32", "float16", "bfloat16"],
           help="default: bfloat16 (or float16) on a GPU; on a CPU bfloat16 through oneDNN where it has AMX or "
                "AVX-512 BF16 units, else float32 (float32: the exact fp32 path)")
    option(parser, "--weights", env_name="WEIGHTS", choices=["auto", "int8"], default=None,
           help="int8: the language model's weights (LM head included) as int8 per output channel, half the bytes "
                "of bf16 for a faster decode; a CPU with AMX or AVX-512 BF16 only (default auto: held in the "
                "precision's own format)")
    if image_mode:
        option(parser, "--image-mode", env_name="IMAGE_MODE", choices=IMAGE_MODES,
               help="how images become visual tokens (default: trained when the checkpoint allows, else flat)")
    option(parser, "--context-length", env_name="CONTEXT_LENGTH", type=int,
           help="cap the context in tokens (default: the model's)")
    option(parser, "--backend", env_name="BACKEND", default="local", choices=["local", "remote"],
           help="the local Paddle model, or a remote OpenAI-compatible engine (see --base-url)")
    option(parser, "--base-url", env_name="BASE_URL", help="the remote engine's URL, e.g. http://host:8000/v1")
    option(parser, "--remote-model", env_name="REMOTE_MODEL", help="the model name on the remote engine")
    option(parser, "--remote-api-key", env_name="REMOTE_API_KEY", help="the API key for the remote engine")


def add_frames_argument(parser: argparse.ArgumentParser) -> None:
    option(parser, "--frames", env_name="FRAMES", type=int,
           help="video frames sampled (default: 16 on a GPU; on a CPU as many, up to 16, as give the first token "
                "within about a minute at this machine's measured speed)")


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float = 0.2) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="answer length limit in tokens")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this probability mass")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random one, reported)")


def settings_from(args) -> GenerationSettings:
    return GenerationSettings.from_inputs(args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                                          args.max_new_tokens, args.seed)


def make_backend(args, on_progress=None, batch_slots: int = 8):
    """The backend the flags ask for: the process-wide local engine, or a remote one. Loading progress goes to
    `on_progress(message, done, total)`, by default progress bars on stderr. `batch_slots`: the most chats one
    decode step of a local engine carries (1 for one stream: its weights are then held for one)."""
    if getattr(args, "backend", "local") == "remote":
        from llava_ui.backends.remote import RemoteEngine  # deferred: a local run never needs httpx's client

        if not args.base_url:
            raise UserError("--backend remote needs --base-url")
        return RemoteEngine(args.base_url, args.remote_model, api_key=args.remote_api_key)
    from llava_ui.engine import get_engine  # deferred: a remote front end starts without Paddle

    engine = get_engine(args.model, hub=args.hub, device=args.device, dtype=args.dtype,
                        image_mode=getattr(args, "image_mode", None), context_length=args.context_length,
                        batch_slots=batch_slots, weights=getattr(args, "weights", None))
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

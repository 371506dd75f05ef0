"""`check`: what this machine runs the model on and why, proven by a short generation.

Prints the versions, the GPUs Paddle sees (or that it sees none), the device and precision chosen with the
reason (llava_ui.model.device), then for the tiny random model, and for the real model when it is already in a
cache (nothing is downloaded), builds it on that device and answers one short question about a picture: load
time, first token time, decode speed, peak GPU memory. Its output is what a GPU report needs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from llava_ui import DEFAULT_MODEL
from llava_ui.commands.common import HelpFormatter, option, version_line
from llava_ui.errors import UserError

QUESTION = "What colours are in this picture?"


def add_check_command(sub) -> None:
    check = sub.add_parser("check", formatter_class=HelpFormatter,
                           help="self-check: the device and precision chosen and why, and a short generation on "
                                "them (paste its output into a GPU report)")
    option(check, "--device", env_name="DEVICE", help="cpu, gpu or gpu:N (cuda, cuda:N) (default: gpu when Paddle "
                                                      "has CUDA)")
    option(check, "--dtype", env_name="DTYPE", choices=["float32", "float16", "bfloat16"],
           help="compute precision (default: bf16 on a GPU that has it, else fp16; on a CPU bf16 where it has bf16 "
                "units, else fp32)")
    option(check, "--weights", env_name="WEIGHTS", choices=["auto", "int8"], default=None,
           help="int8: check the language model with int8 weights (a CPU with AMX or AVX-512 BF16)")
    check.add_argument("--model", action="append", default=None,
                       help="a model to check besides the tiny random one (repeat for several; default: "
                            f"{DEFAULT_MODEL} when it is already in a cache)")
    check.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate per model")
    check.set_defaults(func=cmd_check, log_level="warning")


@dataclass(frozen=True)
class Run:
    """One model's short generation on the chosen device."""

    model: str
    device: str
    precision: str
    weight_layout: str
    load_s: float
    prompt_tokens: int
    tokens: int
    ttft_s: float | None
    decode_tokens_per_s: float | None
    peak_gpu_memory: str

    def line(self) -> str:
        ttft = f"{self.ttft_s:.2f} s" if self.ttft_s is not None else "–"
        speed = f"{self.decode_tokens_per_s:.1f} tokens/s" if self.decode_tokens_per_s else "– (too few tokens)"
        return (f"{self.model}: built on {self.device} ({self.precision}, weights {self.weight_layout}) in "
                f"{self.load_s:.1f} s; {self.prompt_tokens} prompt tokens, {self.tokens} generated; first token "
                f"{ttft}, decode {speed}; peak GPU memory {self.peak_gpu_memory}")


def machine_lines() -> list[str]:
    """Versions, CPU, the GPUs Paddle sees."""
    import platform

    import paddle

    from llava_ui.model.cpu import bf16_units, cpu_threads
    from llava_ui.model.device import BF16_CAPABILITY, gpu_capability, gpu_count, gpu_label

    cuda = paddle.device.is_compiled_with_cuda()
    lines = [version_line() + f"; Python {platform.python_version()}; Paddle built "
             + (f"with CUDA {paddle.version.cuda()}" if cuda else "without CUDA"),
             f"CPU: {_cpu_model()}, {cpu_threads()} threads, bf16 units: {bf16_units() or 'none'}"]
    count = gpu_count()
    if not count:
        lines.append("GPU: no GPU found" + ("" if cuda else " (this Paddle is built without CUDA)"))
    for index in range(count):
        has_bf16 = "bf16" if gpu_capability(index) >= BF16_CAPABILITY else "no bf16"
        lines.append(f"GPU: {gpu_label(index)}, {has_bf16}")
    return lines


def peak_gpu_memory(device: str) -> str:
    """Paddle's peak allocated and reserved memory on `device` ("gpu:N") since the last reset, or why there is none."""
    if not device.startswith("gpu"):
        return "n/a (no GPU found)" if not _gpus() else "n/a (ran on the CPU)"
    import paddle

    index = int(device.split(":")[1])
    allocated = paddle.device.cuda.max_memory_allocated(index)
    reserved = paddle.device.cuda.max_memory_reserved(index)
    return f"{allocated / 2**30:.2f} GiB allocated, {reserved / 2**30:.2f} GiB reserved"


def run_model(model: str, device: str | None, dtype: str | None, max_new_tokens: int,
              weights: str | None = None) -> Run:
    """Build `model` on the chosen device (a fresh engine) and answer QUESTION about a small picture, greedy."""
    import paddle
    from PIL import Image

    from llava_ui.engine import Engine
    from llava_ui.chat.conversation import Conversation
    from llava_ui.config import GenerationSettings

    _reset_peak_memory()
    began = time.perf_counter()
    engine = Engine(model, device=device, dtype=dtype, image_mode="eval", batch_slots=1, weights=weights)
    engine.load()
    load_s = time.perf_counter() - began
    picture = Image.new("RGB", (96, 64), (200, 40, 40))
    picture.paste((40, 40, 200), (48, 0, 96, 64))
    conversation = Conversation()
    conversation.add_user(QUESTION, [picture])
    result = engine.generate(conversation, GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0,
                                                              seed=0))
    options = engine.options
    run = Run(model=model, device=options.device, precision=options.policy.precision,
              weight_layout=options.layout, load_s=load_s, prompt_tokens=result.stats.prompt_tokens or 0,
              tokens=len(result.token_ids), ttft_s=result.stats.ttft_s,
              decode_tokens_per_s=result.stats.decode_tokens_per_s, peak_gpu_memory=peak_gpu_memory(options.device))
    del engine  # (its compute thread idles; the next engine's weights take the freed memory)
    if paddle.device.is_compiled_with_cuda():
        paddle.device.cuda.empty_cache()
    return run


def models_to_check(asked: list[str] | None) -> list[tuple[str, str | None]]:
    """(model, why it is skipped or None) in order: the tiny random model, then the asked ones, or the real model
    when a cache holds it."""
    from llava_ui.checkpoints.hub import cached_model_dir
    from llava_ui.checkpoints.load import TINY_RANDOM

    models = [(TINY_RANDOM, None)]
    for model in asked or [DEFAULT_MODEL]:
        folder = cached_model_dir(model)
        if folder is None:
            models.append((model, "not on this machine (check downloads nothing: run `llava-ui generate` once, or "
                                  "pass --model /path/to/checkpoint)"))
        else:
            models.append((str(folder), None))
    return models


def cmd_check(args) -> int:
    from llava_ui.model.options import options

    for line in machine_lines():
        print(line, flush=True)
    weights = getattr(args, "weights", None)
    # the options a command-line engine loads with (the CPU kernels built, or why not): a UserError here is the
    # answer, exit 2 with the reason, not one failed model after another
    chosen = options(args.device, args.dtype, 1, weights=weights)
    policy = chosen.policy
    print(f"chosen: {policy.device}, {policy.precision} ({policy.dtype}) — {policy.reason}", flush=True)
    print(f"weights: {chosen.weights}", flush=True)
    failed = 0
    for model, skipped in models_to_check(args.model):
        if skipped:
            print(f"{model}: skipped, {skipped}", flush=True)
            continue
        try:
            print(run_model(model, args.device, args.dtype, args.max_new_tokens, weights).line(), flush=True)
        except UserError as err:
            failed += 1
            print(f"{model}: FAILED: {err}", flush=True)
        except Exception as err:  # the report is for a machine nobody here has run: show what broke
            failed += 1
            print(f"{model}: FAILED: {type(err).__name__}: {err}", flush=True)
    print("check " + ("passed" if not failed else f"failed ({failed} model{'s' * (failed > 1)})"), flush=True)
    return 0 if not failed else 1


def _gpus() -> int:
    from llava_ui.model.device import gpu_count

    return gpu_count()


def _reset_peak_memory() -> None:
    import paddle

    if paddle.device.is_compiled_with_cuda():
        for index in range(_gpus()):
            paddle.device.cuda.reset_max_memory_allocated(index)
            paddle.device.cuda.reset_max_memory_reserved(index)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"

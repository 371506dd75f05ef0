"""One chat's decode step at the real dimensions in each CPU precision, against the memory-bandwidth bound measured
in the same run.

    .venv/bin/python bench/decode_step.py                      # fp32, bf16 and int8 kernels, each step whole
                                                               # and layer by layer
    .venv/bin/python bench/decode_step.py --positions 2900 --rounds 7 --variants bf16,int8

Steps alternate between the variants in one process (A/B/C, then again) so that a busy machine slows all alike;
each number is the median over rounds of the mean step of a round. The bound is the bytes a step reads
(language-model weights once, the tied head included, plus the KV cache it attends over: bf16 for the kernels)
divided by the read
bandwidth (bench/run.py's numpy streaming sum, one share per core). Writes bench/results/<name>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import DEFAULT_CHECKPOINTS, ensure_checkpoints, read_bandwidth  # noqa: E402

from llava_ui.checkpoints.load import build_model  # noqa: E402
from llava_ui.model.cpu import bf16_units  # noqa: E402
from llava_ui.engine.steps import decode_one_token, prefill  # noqa: E402
from llava_ui.model.kernels import KernelMatrix  # noqa: E402


def cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text(errors="ignore") if Path("/proc/cpuinfo").exists() else ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown")


def weight_bytes(model) -> int:
    """Bytes of the language model's weights a decode step reads (layers and head; not the embedding lookup): the
    kernels' matrices as they hold them (bf16: 2 bytes a weight, int8: 1 and a scale per output), else fp32."""
    def size(weight) -> int:
        return weight.nbytes if isinstance(weight, KernelMatrix) else int(np.prod(weight.shape)) * 4

    runner = model.runner
    total = sum(size(getattr(part, name)) for attention, feed in runner.parts for part in attention + feed
                for name in part.WEIGHTS)
    return total + sum(size(m) for m in (runner.head or [model.language_model.lm_head.weight]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=760, help="prompt positions before the timed steps")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per variant and round")
    parser.add_argument("--name", default="decode-step")
    parser.add_argument("--variants", default="fp32,bf16,int8",
                        help="which to time: fp32, bf16 (the kernel, and its attention as Paddle ops), int8 (--weights int8)")
    args = parser.parse_args()
    model_dir = ensure_checkpoints(DEFAULT_CHECKPOINTS)["paddle"]
    quiet = lambda *a, **k: None  # noqa: E731
    wanted = args.variants.split(",")
    variants = {}
    if "fp32" in wanted:
        variants["fp32"] = (build_model(model_dir, "float32", quiet)[0], None, None)
    if bf16_units() and "bf16" in wanted:  # (model, attention kernel, whole step as one call per worker)
        bf16 = build_model(model_dir, "float32", quiet, "bf16")[0]
        variants["bf16 kernel"] = (bf16, True, True)
        variants["bf16 kernel, layer by layer"] = (bf16, True, False)
        variants["bf16 kernel, layer by layer, attention as Paddle ops"] = (bf16, False, False)
    if bf16_units() and "int8" in wanted:
        int8 = build_model(model_dir, "float32", quiet, "int8")[0]
        variants["int8 kernel (--weights int8)"] = (int8, True, True)
        variants["int8 kernel, layer by layer"] = (int8, True, False)
    ids = np.random.default_rng(0).integers(100, 5000, args.positions).tolist()
    caches, position = {}, {}
    def use(variant):
        model, attention_kernel, whole_step = variant
        if attention_kernel is not None:
            model.runner.attention_kernel, model.runner.whole_step = attention_kernel, whole_step
        return model

    for name, variant in variants.items():  # each variant its own cache (bf16 for the kernels)
        model = use(variant)
        _, caches[name] = prefill(model, model.embed_prompt(ids, []), room=args.rounds * args.steps + 8)
        position[name] = args.positions
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, variant in variants.items():
            model = use(variant)
            began = time.perf_counter()
            for _ in range(args.steps):
                _, caches[name] = decode_one_token(model, 5, caches[name], position[name])
                position[name] += 1
            times[name].append((time.perf_counter() - began) / args.steps)
    bandwidth = read_bandwidth()
    rows = []
    for name, (model, _, _) in variants.items():
        step = statistics.median(times[name])
        cache = caches[name]
        kv_per_position = 2 * len(cache.keys) * model.runner.kv_heads * model.runner.head_dim * cache.keys[0].element_size()
        read = weight_bytes(model) + kv_per_position * (args.positions + args.rounds * args.steps)
        bound = bandwidth / read
        rows.append({"variant": name, "step_ms": step * 1e3, "tokens_per_s": 1 / step, "bytes_read": read,
                     "bound_tokens_per_s": bound, "fraction_of_bound": (1 / step) / bound})
    report = {"cpu": cpu_model(), "bf16_units": bf16_units(), "positions": args.positions, "rounds": args.rounds,
              "steps": args.steps, "read_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}
    lines = [f"Decode step at {args.positions} positions, {cpu_model()} (bf16 units: {bf16_units() or 'none'}), "
             f"read bandwidth {bandwidth / 1e9:.1f} GB/s; median of {args.rounds} alternating rounds of "
             f"{args.steps} steps.", "",
             "| variant | step | tokens/s | bytes a step reads | bound | of the bound |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['step_ms']:.1f} ms | {row['tokens_per_s']:.1f} | "
                     f"{row['bytes_read'] / 1e9:.2f} GB | {row['bound_tokens_per_s']:.1f} | "
                     f"{row['fraction_of_bound']:.2f} |")
    out = HERE / "results"
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

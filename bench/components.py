"""Time the model's parts, Paddle against transformers, alternating in one process (a profiling aid, not the bench).

    .venv/bin/python bench/components.py [--reps 5] [--parts sgemm,vision1,vision8,prefill,decode]

Both models load from the bench checkpoints (same weights). Reports wall time and process CPU time per part
(CPU time is steadier on a shared machine: it counts only the work this process got to do), and for the
compute-bound parts the arithmetic rate: the part's floating-point operations (a multiply-add counts 2; causal
attention counts only the positions it may see) over its wall time. `sgemm` is one [729×1152]·[1152×4304]
matmul (SigLIP's fc1 on one image) through each library: the machine's fp32 matrix rate as each library gets it,
so (vision + prefill operations) / that rate is the least time a first token can take in fp32.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import DEFAULT_CHECKPOINTS, ensure_checkpoints  # noqa: E402

V_TOKENS, V_HIDDEN, V_INTER, V_LAYERS = 729, 1152, 4304, 26  # SigLIP so400m at 384 px, LLaVA's 26 layers
HIDDEN, INTER, LAYERS = 1024, 2816, 24  # Qwen1.5-0.5B


def vision_flops(images: int) -> float:
    n, h = V_TOKENS, V_HIDDEN
    per_layer = 2 * n * (4 * h * h + 2 * h * V_INTER) + 2 * 2 * n * n * h
    patches = 2 * n * (3 * 14 * 14) * h
    projector = 2 * n * (h * HIDDEN + HIDDEN * HIDDEN)
    return images * (V_LAYERS * per_layer + patches + projector)


def prefill_flops(tokens: int) -> float:
    seen = tokens * (tokens + 1) / 2  # causal (query, key) pairs
    return LAYERS * (2 * tokens * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER) + 2 * 2 * seen * HIDDEN)


SGEMM = (729, 1152, 4304)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--parts", default="sgemm,vision1,vision8,prefill,decode")
    parser.add_argument("--sides", default="paddle,transformers")
    parser.add_argument("--prefill-tokens", type=int, default=760)
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    args = parser.parse_args(argv)
    dirs = ensure_checkpoints(args.checkpoints)
    parts, sides = args.parts.split(","), args.sides.split(",")
    rng = np.random.default_rng(0)
    pixels = {n: rng.uniform(-1, 1, (n, 3, 384, 384)).astype(np.float32) for n in (1, 8)}
    embeds = rng.standard_normal((1, args.prefill_tokens, 1024)).astype(np.float32) * 0.5
    gemm_a, gemm_b = (rng.standard_normal(shape).astype(np.float32) for shape in (SGEMM[:2], SGEMM[1:]))
    flops = {"sgemm": 2 * SGEMM[0] * SGEMM[1] * SGEMM[2], "vision1": vision_flops(1), "vision8": vision_flops(8),
             "prefill": prefill_flops(args.prefill_tokens)}
    funcs = {}
    if "paddle" in sides:
        import paddle

        from llava_ui.checkpoints.load import build_model
        from llava_ui.engine.steps import decode_one_token, prefill

        paddle.set_grad_enabled(False)
        model, _, _ = build_model(dirs["paddle"])
        p_embeds = paddle.to_tensor(embeds)
        _, p_cache = prefill(model, p_embeds)
        p_a, p_b = paddle.to_tensor(gemm_a), paddle.to_tensor(gemm_b)
        funcs["paddle"] = {
            "sgemm": lambda: paddle.matmul(p_a, p_b).numpy(),
            "vision1": lambda: model.encode_views(pixels[1]).numpy(),
            "vision8": lambda: model.encode_views(pixels[8]).numpy(),
            "prefill": lambda: prefill(model, p_embeds)[0].numpy(),
            "decode": lambda: decode_one_token(model, 42, p_cache, args.prefill_tokens)[0].numpy(),
        }
    if "transformers" in sides:
        import torch
        from transformers import LlavaForConditionalGeneration

        torch.set_grad_enabled(False)
        hf = LlavaForConditionalGeneration.from_pretrained(str(dirs["transformers"]), torch_dtype=torch.float32).eval()
        t_embeds = torch.from_numpy(embeds)
        out = hf.model.language_model(inputs_embeds=t_embeds, use_cache=True)
        t_cache = out.past_key_values

        def t_decode():
            step = hf(input_ids=torch.tensor([[42]]), past_key_values=t_cache, use_cache=True, logits_to_keep=1)
            t_cache.crop(args.prefill_tokens)  # back to the prompt for the next round
            return step.logits

        t_a, t_b = torch.from_numpy(gemm_a), torch.from_numpy(gemm_b)
        funcs["transformers"] = {
            "sgemm": lambda: torch.matmul(t_a, t_b),
            "vision1": lambda: hf.get_image_features(pixel_values=torch.from_numpy(pixels[1]), vision_feature_layer=-1,
                                                     vision_feature_select_strategy="full"),
            "vision8": lambda: hf.get_image_features(pixel_values=torch.from_numpy(pixels[8]), vision_feature_layer=-1,
                                                     vision_feature_select_strategy="full"),
            "prefill": lambda: hf(inputs_embeds=t_embeds, use_cache=True, logits_to_keep=1).logits,
            "decode": t_decode,
        }
    results = {(s, p): [] for s in funcs for p in parts}
    for rep in range(args.reps + 1):  # the first round is the warm-up
        for part in parts:
            for side in funcs:
                wall, cpu = timed(funcs[side][part])
                if rep:
                    results[(side, part)].append((wall, cpu))
    print(f"{'part':10s} {'side':12s} {'wall s':>8s} {'cpu s':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s}   (medians of {args.reps})")
    for part in parts:
        for side in funcs:
            walls, cpus = zip(*results[(side, part)])
            wall = statistics.median(walls)
            rate = f"{flops[part] / 1e9:8.1f} {flops[part] / wall / 1e9:8.1f}" if part in flops else ""
            print(f"{part:10s} {side:12s} {wall:8.3f} {statistics.median(cpus):8.3f} {rate}")


if __name__ == "__main__":
    main()

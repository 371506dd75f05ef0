"""Why decode steps stay fp32 on the CPU: a decode step whose weight matmuls are bf16 oneDNN programs at one row,
against the fp32 step, at the real dimensions.

    .venv/bin/python bench/decode_programs.py              # caches of 1,000 positions, medians of 7 steps

One process loads the random-weight real-size checkpoint in fp32 and exports, per layer, four one-row programs
(llava_ui.model.onednn.Program, the same kind the prefill uses): q|k|v, o_proj (the parts' sum), gate|up, and
down_proj (the parts' sum) — nothing but oneDNN fc ops, so each call is one matrix-vector product in bf16, half
the bytes of fp32. Attention, RoPE, the norms and SwiGLU stay the fp32 code between them, as in the prefill.
It times the whole step both ways, each program kind alone (called 10 times on one layer's weights: those stay
in the CPU caches) and the same calls inside the step (accumulated per kind), and the bf16 step's agreement
with the fp32 one. Writes bench/results/decode-programs.json and .md. (The programs cost another bf16 copy of
the language model's weights, ~0.6 GB; the engine does not use them.)
"""
from __future__ import annotations

import argparse
import collections
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    import numpy as np
    import paddle
    import paddle.nn.functional as F

    from llava_ui.checkpoints.load import build_model
    from llava_ui.model.bf16 import dims_of
    from llava_ui.model.cpu import run_parts
    from llava_ui.model.onednn import Program, _spec
    from llava_ui.model.attention import AttentionStep
    from llava_ui.model.qwen2 import _total, rms_norm

    model = build_model(ensure_checkpoints(args.checkpoints)["paddle"], "float32", lambda *a, **k: None)[0]
    runner = model.runner
    dims = {**dims_of(model), "parts": [[p.q_heads for p in runner.parts[0][0]],  # (the export cache's key)
                                         [p.gate_up.shape[1] for p in runner.parts[0][1]]]}

    def _zeros_for(weight):  # a bias makes matmul + bias oneDNN's fc, which keeps its bf16 weights
        return paddle.zeros([weight.shape[1]])
    layers, hidden = runner.qwen2.layers, model.config.text["hidden_size"]

    def summed(*inputs):  # [a_0 .. a_n, w_0, b_0 .. w_n, b_n] → Σ a_p · w_p + b_p
        n = len(inputs) // 3
        return _total([F.linear(inputs[p], inputs[n + 2 * p], inputs[n + 2 * p + 1]) for p in range(n)])

    def each(h, *w):
        return [F.linear(h, w[2 * p], w[2 * p + 1]) for p in range(len(w) // 2)]

    def weights(parts, name):
        return [t for part in parts for t in (getattr(part, name), _zeros_for(getattr(part, name)))]

    programs = []
    for i, (attention, feed) in enumerate(runner.parts):
        tag = f"decode{i}"
        programs.append({
            "qkv": Program(f"{tag}-qkv", each, [_spec([1, hidden], f"{tag}_h")],
                           [t for part in attention for t in (part.qkv, part.bias if part.bias is not None
                                                              else _zeros_for(part.qkv))], dims),
            "o": Program(f"{tag}-o", summed, [_spec([1, p.o_rows.shape[0]], f"{tag}_a{j}")
                                              for j, p in enumerate(attention)], weights(attention, "o_rows"), dims),
            "gate_up": Program(f"{tag}-gu", each, [_spec([1, hidden], f"{tag}_g")], weights(feed, "gate_up"), dims),
            "down": Program(f"{tag}-down", summed, [_spec([1, p.down_rows.shape[0]], f"{tag}_d{j}")
                                                    for j, p in enumerate(feed)], weights(feed, "down_rows"), dims)})
    rng = np.random.default_rng(0)
    prompt = paddle.to_tensor(rng.standard_normal((1, args.positions, hidden)).astype("float32") * 0.02)
    cache = runner.forward(prompt, None, 0)[1]
    cache = runner.reserve(cache.prefix(args.positions), args.positions + 1)
    token = paddle.to_tensor(rng.standard_normal((1, hidden)).astype("float32") * 0.02)
    spent = collections.Counter()

    def timed(kind, fn):
        began = time.perf_counter()
        out = fn()
        spent[kind] += time.perf_counter() - began
        return out

    def bf16_step():
        step = AttentionStep(runner, cache, args.positions, 1, token.dtype, False)
        x, residual = rms_norm(token, layers[0].input_layernorm.weight, runner.eps)
        for i, (layer, (attention, feed)) in enumerate(zip(layers, runner.parts)):
            own = programs[i]
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else runner.qwen2.norm
            projected = timed("qkv", lambda: own["qkv"](x))
            heads = run_parts(lambda p: step.attend(attention[p], projected[p], i), list(range(len(attention))))
            x, residual = rms_norm(timed("o", lambda: own["o"](*heads)[0]), layer.post_attention_layernorm.weight,
                                   runner.eps, residual)
            gate_up = timed("gate_up", lambda: own["gate_up"](x))
            acts = run_parts(lambda p: F.swiglu(gate_up[p]), list(range(len(feed))))
            x, residual = rms_norm(timed("down", lambda: own["down"](*acts)[0]), following.weight, runner.eps,
                                   residual)
        return x

    def fp32_step():
        return runner.decode_batch(token, [cache], [args.positions])[0]

    def median_ms(fn, reps=args.reps) -> float:
        fn()
        times = []
        for _ in range(reps):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return statistics.median(times) * 1000

    exact, low = fp32_step().numpy(), bf16_step().numpy()
    steps = {"fp32": [], "bf16": []}
    for _ in range(2):  # alternating rounds
        steps["fp32"].append(median_ms(fp32_step))
        spent.clear()
        steps["bf16"].append(median_ms(bf16_step))
    in_step = {kind: spent[kind] / (args.reps + 1) / len(layers) * 1000 for kind in ("qkv", "o", "gate_up", "down")}
    first = programs[0]
    inputs = {"qkv": [token], "gate_up": [token],
              "o": [paddle.zeros([1, p.o_rows.shape[0]]) for p in runner.parts[0][0]],
              "down": [paddle.zeros([1, p.down_rows.shape[0]]) for p in runner.parts[0][1]]}
    alone = {kind: median_ms(lambda: [first[kind](*inputs[kind]) for _ in range(10)], 5) / 10 for kind in inputs}
    part = runner.parts[0][0][0]
    fp32_part_qkv = median_ms(lambda: [F.linear(token, part.qkv, part.bias) for _ in range(10)], 5) / 10
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
              "positions": args.positions, "fp32_step_ms": statistics.median(steps["fp32"]),
              "bf16_programs_step_ms": statistics.median(steps["bf16"]), "rounds": steps,
              "per_call_in_step_ms": in_step, "per_call_alone_ms": alone, "fp32_part_qkv_alone_ms": fp32_part_qkv,
              "max_rel_error": float(np.abs(exact - low).max() / np.abs(exact).max()),
              "cosine": float((exact * low).sum() / np.linalg.norm(exact) / np.linalg.norm(low))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode-programs.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# A decode step with bf16 one-row programs vs fp32 ({report['date']})", "",
             f"CPU: {report['cpu']}; real dimensions, a cache of {args.positions} positions; the layers only "
             f"(no LM head); medians of {args.reps} steps, 2 alternating rounds.", "",
             f"- fp32 step: {report['fp32_step_ms']:.0f} ms; with bf16 programs: "
             f"{report['bf16_programs_step_ms']:.0f} ms (rounds: "
             + "; ".join(f"{k} " + " / ".join(f"{t:.1f}" for t in v) for k, v in steps.items()) + ")",
             "- per program call inside the step (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in in_step.items()),
             "- the same call alone, 10 times over one layer's weights (ms): "
             + ", ".join(f"{k} {v:.2f}" for k, v in alone.items()),
             f"- for scale, one worker's fp32 q|k|v matmul alone: {fp32_part_qkv:.2f} ms",
             f"- bf16 vs fp32 last hidden state: max rel. error {report['max_rel_error']:.4f}, "
             f"cosine {report['cosine']:.6f}", ""]
    (args.out / "decode-programs.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a batched decode step's time goes, at the real dimensions, per batch size and weight layout.

    .venv/bin/python bench/batch_steps.py                  # rows 1, 2, 4, 8; three layouts; caches of ~1,000 positions
    .venv/bin/python bench/batch_steps.py --rows 1,4 --reps 9
    .venv/bin/python bench/batch_steps.py --positions 2800     # caches as long as the server's one-image prompts

One process loads the random-weight real-size checkpoint in fp32 (the decode path of both precisions) and times
`Qwen2Runner.decode_batch` over B caches of 1,000-1,070 positions (--positions moves the 1,000): the whole step
through the layers, the same with attention replaced by zeros (the dense part: weight matmuls, norms, the hand-offs
between the cores), the difference (attention: the cache writes, scores and values per chat; RoPE counts as dense),
and the LM head over B rows. The weight layouts alternate in the same process (every part holds each layout's
copy; the attributes are swapped between rounds): "in-out" as stored (the command line), "out-in" (what a CPU
engine that batches uses) and "packed" (for MKL's packed sgemm, LLAVA_UI_BATCH_LAYOUT=packed; linear.project,
packed.py). Medians over the rounds.
Writes bench/results/<name>.json and .md (--name, default batch-steps).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
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
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two layouts")
    parser.add_argument("--layouts", default="in-out,out-in,packed")
    parser.add_argument("--positions", type=int, default=1000, help="filled positions of the first cache (the "
                        "others 10 more each)")
    parser.add_argument("--name", default="batch-steps")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    import paddle

    from llava_ui.checkpoints.load import build_model
    from llava_ui.model import attention

    model = build_model(ensure_checkpoints(args.checkpoints)["paddle"], "float32", lambda *a, **k: None)[0]
    runner, rows = model.runner, [int(r) for r in args.rows.split(",")]
    first = args.positions
    caches = [runner.reserve(None, first + 300) for _ in range(max(rows))]
    for cache in caches:
        cache.length = first
    positions = [first + 10 * i for i in range(max(rows))]
    spread = f"{first:,}-{positions[-1]:,}"
    hidden = model.config.text["hidden_size"]

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(args.reps):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return 1000 * statistics.median(times)

    def no_attention(self, part, qkv, layer):  # one row's attention (after RoPE) replaced by zeros
        return paddle.zeros([1, part.q_heads * self.dim], qkv.dtype)

    from llava_ui.model.packed import PackedMatrix

    layouts = args.layouts.split(",")
    parts = [part for attention, feed in runner.parts for part in attention + feed]
    copies = {}  # (part, layout) -> its weights in that layout
    for part in parts:
        stored = {name: getattr(part, name) for name in part.WEIGHTS}
        copies[id(part), "in-out"] = stored
        copies[id(part), "out-in"] = {n: paddle.transpose(w, [1, 0]).contiguous() for n, w in stored.items()}
        copies[id(part), "packed"] = {n: PackedMatrix(w) for n, w in stored.items()} if "packed" in layouts else {}

    def use(layout):  # every part's weights in `layout`
        for part in parts:
            for name, weight in copies[id(part), layout].items():
                setattr(part, name, weight)
            part.transposed, part.packed = layout == "out-in", layout == "packed"

    attend = attention.AttentionStep._decode
    results: dict = {}
    for _ in range(args.rounds):
        for layout in layouts:
            use(layout)
            for b in rows:
                embeds = paddle.randn([b, hidden])
                step = lambda: runner.decode_batch(embeds, caches[:b], positions[:b])  # noqa: E731
                layers = median_ms(step)
                attention.AttentionStep._decode = no_attention
                try:
                    dense = median_ms(step)
                finally:
                    attention.AttentionStep._decode = attend
                head = median_ms(lambda: model.logits(embeds))
                for key, value in (("layers", layers), ("dense", dense), ("head", head)):
                    results.setdefault(layout, {}).setdefault(b, {}).setdefault(key, []).append(value)
    table = {layout: {b: {k: statistics.median(v) for k, v in by.items()} for b, by in per.items()}
             for layout, per in results.items()}
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
              "cores": len(os.sched_getaffinity(0)), "cache_positions": spread, "rounds": args.rounds,
              "ms": table}
    lines = [f"# A batched decode step at the real dimensions ({report['date']})", "",
             f"CPU: {report['cpu']}, {report['cores']} cores; fp32; caches of {spread} positions; medians of "
             f"{args.rounds} alternating rounds x {args.reps} calls (ms).", "",
             "| layout | rows | step (layers + head) | dense | attention | head | per row | vs 1 row of the same layout |",
             "|---|---|---|---|---|---|---|---|"]
    for layout, per in table.items():
        one = per[min(per)]["layers"] + per[min(per)]["head"]
        for b, m in per.items():
            total = m["layers"] + m["head"]
            lines.append(f"| {layout} | {b} | {total:.0f} | {m['dense']:.0f} | {m['layers'] - m['dense']:.0f} | "
                         f"{m['head']:.0f} | {total / b:.0f} | {total / one:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode steps at a long position with the RoPE tables kept (built once, doubled when outgrown) against the tables
rebuilt for every token (what every step past 4,096 positions did before), A/B alternating in one process.

    .venv/bin/python bench/rope_decode.py --model /path/to/checkpoint --positions 11680

The cache is reserved for the positions and marked filled without a prefill: a decode step's cost does not
depend on what the cache holds. fp32 on the CPU (decode steps run fp32 in the bf16 engine too). Prints the CPU
model, the median step per side and the speed-up; --json writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import cpu_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint folder (e.g. a real-size random one)")
    parser.add_argument("--positions", type=int, default=11_680, help="where decoding starts (16 frames: 11,680)")
    parser.add_argument("--steps", type=int, default=10, help="decode steps per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import paddle

    from llava_ui.checkpoints.load import build_model
    from llava_ui.engine.steps import decode_one_token

    paddle.set_grad_enabled(False)
    model, config, _ = build_model(Path(args.model), progress=lambda *a, **k: None)
    rotary = model.runner.rotary
    cache = model.reserve(None, args.positions + args.steps * args.rounds * 2 + 1)
    position = cache.length = args.positions
    times = {"kept": [], "rebuilt per token": []}
    decode_one_token(model, 5, cache, position)  # warm-up: tables, masks, oneDNN/MKL state
    position += 1
    for _ in range(args.rounds):
        for side, step_times in times.items():
            for _ in range(args.steps):
                if side != "kept":
                    rotary.cos = rotary.sin = None  # the next step builds them for its own position
                began = time.perf_counter()
                _, cache = decode_one_token(model, 5, cache, position)
                step_times.append(time.perf_counter() - began)
                position += 1
    medians = {side: 1000 * statistics.median(t) for side, t in times.items()}
    report = {"cpu": cpu_model(), "hidden": config.text["hidden_size"], "layers": config.text["num_hidden_layers"],
              "positions": args.positions, "steps": len(times["kept"]), "median_ms": medians,
              "speedup": medians["rebuilt per token"] / medians["kept"]}
    print(f"{report['cpu']}: hidden {report['hidden']}, {report['layers']} layers, decode at {args.positions:,} "
          f"positions, {report['steps']} steps a side: tables kept {medians['kept']:.1f} ms a step, rebuilt per "
          f"token {medians['rebuilt per token']:.1f} ms ({report['speedup']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a batched decode step's extra rows go at long prompts: B chats over B caches of their own against B rows
over one cache they all read (a shared prompt prefix, as the served concurrent case's chats about one picture have),
at the real dimensions, bf16 kernels, the whole step. If a row's attention were bound by the bytes of its own cache,
the shared rows would cost little; what they cost instead is the attention's arithmetic per row.

    .venv/bin/python bench/shared_rows.py                       # 2,900 positions (the served case's prompts)
    .venv/bin/python bench/shared_rows.py --positions 64 --rows 1,2,4,8

The caches hold zeros (timing only; the rows over the shared cache write their new positions into the same
place). Medians over `--reps` steps, rounds alternating. Writes bench/results/<name>.json and .md.
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

from run import DEFAULT_CHECKPOINTS, cpu_model, ensure_checkpoints  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=2900)
    parser.add_argument("--rows", default="1,4,8")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=0, help="each cache's positions (default: 200 past the prompt)")
    parser.add_argument("--name", default="shared-rows")
    args = parser.parse_args(argv)
    from llava_ui.checkpoints.load import build_model
    from llava_ui.model.cpu import configure_cpu

    configure_cpu()
    model = build_model(ensure_checkpoints(DEFAULT_CHECKPOINTS)["paddle"], "float32", lambda *a, **k: None, "bf16")[0]
    rows = [int(r) for r in args.rows.split(",")]
    room = args.capacity or args.positions + 200

    def cache():
        made = model.runner.reserve(None, room)
        made.length = args.positions
        return made

    own, shared = [cache() for _ in range(max(rows))], cache()
    position = args.positions
    times = {(b, kind): [] for b in rows for kind in ("own", "shared")}
    for _ in range(args.rounds):
        for b in rows:
            for kind, caches in (("own", own[:b]), ("shared", [shared] * b)):
                for _ in range(args.reps):
                    began = time.perf_counter()
                    model.decode_batch([5] * b, caches, [position] * b)
                    times[b, kind].append(time.perf_counter() - began)
                position += 1
    report = {"cpu": cpu_model(), "positions": args.positions,
              "step_ms": {f"{b} {kind}": 1e3 * statistics.median(t) for (b, kind), t in times.items()}}
    lines = [f"Batched decode step (bf16 kernels, whole step) at {args.positions} positions, {cpu_model()}; median "
             f"of {args.rounds * args.reps} steps.", "", "| rows | own caches | one shared cache |", "|---:|---:|---:|"]
    for b in rows:
        lines.append(f"| {b} | {report['step_ms'][f'{b} own']:.1f} ms | {report['step_ms'][f'{b} shared']:.1f} ms |")
    (HERE / "results" / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (HERE / "results" / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

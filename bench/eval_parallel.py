"""`llava_ui eval --parallel N` against one sample at a time, at the real dimensions, in one run.

    .venv/bin/python bench/eval_parallel.py                          # 8 samples, --parallel 1 and 4, 48 tokens
    .venv/bin/python bench/eval_parallel.py --samples 8 --parallel 1,4,8 --tokens 32 --dtype float32

A small benchmark folder in the evaluation's own format (one picture and one question per sample, every
picture different) is answered by the random-weight real-size checkpoint, each --parallel value in its own
process, with the answers capped at --tokens new tokens (the reference's 1024 would be minutes per sample on a
random model, which rarely stops). Reports the wall-clock time of each run, the speed-up over --parallel 1, the
runner's own closing line (how many samples shared a decode step, the solo and batched step times) and whether
result.jsonl is the same as one at a time. Writes bench/results/eval-parallel.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from run import DEFAULT_CHECKPOINTS, cpu_model, ensure_checkpoints  # noqa: E402

SPLIT = "multi_image_in_domain"


def write_benchmark(folder: Path, count: int) -> Path:
    """`count` samples in the benchmark's format: one picture (every one different) and one question each."""
    from cases import picture

    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        name = f"Split1/bench/{i}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        picture(1000 + i).save(folder / name)
        samples.append({"sample_id": i, "image": [name], "conversations": [
            {"from": "human", "value": f"<image>What is in this picture? ({i})"}, {"from": "gpt", "value": "a picture"}],
            "metadata": {"dataset": "Spot-the-Diff", "question_type": "open-ended"}})
    (folder / f"{SPLIT}.json").write_text(json.dumps(samples))
    return folder


def run_one(model: Path, data: Path, out: Path, parallel: int, tokens: int, dtype: str | None) -> None:
    """In this process: the eval command with answers capped at `tokens` new tokens."""
    from llava_ui.commands import eval as eval_command
    from llava_ui.commands import main as cli
    from llava_ui.eval import answerers

    answerers.EVAL_MAX_NEW_TOKENS = eval_command.EVAL_MAX_NEW_TOKENS = tokens  # the cap and the closing line's
    flags = ["--dtype", dtype] if dtype else []
    sys.exit(cli.main(["eval", "--model", str(model), "--data", str(data), "--split", SPLIT, "--out", str(out),
                       "--parallel", str(parallel), *flags]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--parallel", default="1,4", help="--parallel values to run (default 1,4)")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per answer (default 48)")
    parser.add_argument("--dtype", default=None, help="the eval's --dtype (default: the engine's default)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)  # internal: one run in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model = ensure_checkpoints(args.checkpoints)["paddle"]
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / "llava_ui_bench_eval"
    if args.run:
        run_one(model, work / "data", work / f"out-{args.run}", args.run, args.tokens, args.dtype)
    write_benchmark(work / "data", args.samples)
    runs = {}
    for parallel in [int(p) for p in args.parallel.split(",")]:
        out = work / f"out-{parallel}"
        if out.exists():
            for f in out.iterdir():
                f.unlink()
        cmd = [sys.executable, __file__, "--run", str(parallel), "--work", str(work), "--tokens", str(args.tokens),
               "--checkpoints", str(args.checkpoints)] + (["--dtype", args.dtype] if args.dtype else [])
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode:
            raise RuntimeError(f"--parallel {parallel} failed:\n{proc.stderr[-3000:]}")
        closing = next((line for line in proc.stdout.splitlines() if "turns answered" in line), "")
        runs[parallel] = {"seconds_with_load": seconds, "closing_line": closing.strip(),
                          "result": (out / "result.jsonl").read_text()}
        print(f"--parallel {parallel}: {seconds:.0f} s (with loading); {closing.strip()}", flush=True)
    first = min(runs)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
              "cores": len(os.sched_getaffinity(0)), "samples": args.samples, "tokens": args.tokens,
              "dtype": args.dtype or "default",
              "runs": {p: {k: v for k, v in r.items() if k != "result"} | {"same_as_one_at_a_time":
                                                                          r["result"] == runs[first]["result"]}
                       for p, r in runs.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval-parallel.json").write_text(json.dumps(report, indent=1))
    lines = [f"# eval --parallel at the real dimensions ({report['date']})", "",
             f"CPU: {report['cpu']}, {report['cores']} cores; random-weight real-size checkpoint; dtype "
             f"{report['dtype']}; {args.samples} samples (one picture each), {args.tokens} new tokens each.", "",
             "| --parallel | wall clock with loading (s) | vs --parallel 1 | result.jsonl as one at a time | the runner's closing line |",
             "|---|---|---|---|---|"]
    for p, r in report["runs"].items():
        base = report["runs"][first]["seconds_with_load"]
        lines.append(f"| {p} | {r['seconds_with_load']:.0f} | {base / r['seconds_with_load']:.2f}x | "
                     f"{r['same_as_one_at_a_time']} | {r['closing_line']} |")
    (args.out / "eval-parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

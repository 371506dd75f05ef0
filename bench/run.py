"""Benchmark the Paddle engine against transformers' LlavaForConditionalGeneration on the same random weights.

    .venv/bin/python bench/run.py                      # every case, 3 repetitions per side
    .venv/bin/python bench/run.py --reps 1 --cases 1-image,answer-256

Real dimensions (Qwen2 1024×24 with the 152k vocabulary, SigLIP 1152×26), one checkpoint written once per layout
from the same seed (same weights). Every (side, case, repetition) is its own subprocess, run alternately
(paddle, transformers, paddle, ...), so peak RSS is clean and machine noise hits both sides alike; medians are
reported. Writes bench/results/latest.json and latest.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from cases import CASES  # noqa: E402

from llava_ui.config import app_home  # noqa: E402
from llava_ui.model.cpu import bf16_units  # noqa: E402

DEFAULT_CHECKPOINTS = app_home() / "bench-real"
LAYOUTS = {"paddle": "lmms", "transformers": "hf"}


def ensure_checkpoints(root: Path) -> dict[str, Path]:
    from llava_ui.checkpoints.random import write_random_checkpoint

    dirs = {}
    for side, layout in LAYOUTS.items():
        target = root / layout
        if not (target / "config.json").exists():
            print(f"writing the real-dimension random checkpoint ({layout}) to {target} ...", flush=True)
            write_random_checkpoint(target, layout, "real", vocab="qwen", seed=0)
        dirs[side] = target
    return dirs


def weight_bytes(lmms_dir: Path) -> dict[str, int]:
    """fp32 bytes of what the model holds, and of what one decode step reads (every language-model weight,
    the tied embedding once, as the head; the vision tower and projector are idle while decoding)."""
    from llava_ui.checkpoints.weights import read_safetensors

    total = decode = 0
    for name, array in read_safetensors(lmms_dir / "model.safetensors").items():
        if ".post_layernorm." in name:
            continue  # LLaVA never uses it; the model does not hold it
        size = array.size * 4
        total += size
        if not name.startswith(("model.vision_tower.", "model.mm_projector.")) and name != "model.image_newline":
            decode += size
    return {"model_fp32": total, "decode_read_per_token": decode}


BANDWIDTH_SCRIPT = """
import os, time, numpy as np
from concurrent.futures import ThreadPoolExecutor
cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
a = np.ones(2 * 1024**3 // 4, dtype=np.float32)
parts = np.array_split(a, cores)  # one share per core, summed at once (numpy releases the GIL)
pool = ThreadPoolExecutor(cores)
def read():
    list(pool.map(np.sum, parts))
read(); read()
times = []
for _ in range(7):
    t = time.perf_counter(); read(); times.append(time.perf_counter() - t)
times.sort()
print(a.nbytes / times[len(times) // 2])
"""


def read_bandwidth() -> float:
    """Bytes/s of a numpy streaming sum over a 2 GB float32 array, one share per core at once (what the decode
    step's readers get), median of 7, in a clean process."""
    out = subprocess.run([sys.executable, "-c", BANDWIDTH_SCRIPT], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_worker(side: str, case: str, model_dir: Path, device: str | None) -> dict:
    cmd = [sys.executable, str(HERE / "worker.py"), side, case, str(model_dir)] + (["--device", device] if device else [])
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} {case} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - started
    return result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    out = {"python": platform.python_version()}
    from importlib import metadata

    for name, dist in (("paddle", "paddlepaddle"), ("paddlenlp", "paddlenlp"), ("torch", "torch"),
                       ("transformers", "transformers"), ("numpy", "numpy")):
        try:  # the installed version, without importing the package (paddlenlp's full import is not installed)
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # a missing package is reported, not fatal
            out[name] = None
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


PEERS = [("paddle", "transformers"), ("paddle", "transformers-bf16"), ("paddle-fp32", "transformers"),
         ("paddle-int8", "transformers-bf16")]


def engine_of(side: str) -> str:
    """paddle-fp32, paddle-int8 → paddle, transformers-bf16 → transformers (the checkpoint each reads)."""
    return side.split("-")[0]


def summarise(runs: dict, sizes: dict, bandwidth: float) -> dict:
    """Medians per (case, side) and the ratios the targets speak about."""
    table = {}
    for case, sides in runs.items():
        row = {"sides": {}, "ratios": {}}
        for side, results in sides.items():
            row["sides"][side] = {
                "ttft_s": median([r["first"]["ttft_s"] for r in results]),
                "decode_tokens_per_s": median([r["first"]["decode_tokens_per_s"] for r in results]),
                "peak_rss_bytes": median([r["peak_rss"] for r in results]),
                "rss_ratio": median([r["peak_rss"] for r in results]) / sizes["model_fp32"],
                "load_s": median([r["load_s"] for r in results]),
                "prompt_tokens": results[0]["first"]["prompt_tokens"],
                "first_ids": results[0]["first"]["first_ids"],
                "precision": results[0].get("precision") or results[0].get("dtype"),
            }
            if "second" in results[0]:
                row["sides"][side]["second_ttft_s"] = median([r["second"]["ttft_s"] for r in results])
                row["sides"][side]["second_turn_ratio"] = median([r["second"]["ttft_s"] / r["first"]["ttft_s"]
                                                                  for r in results])
        for a, b in PEERS:
            if a in sides and b in sides:
                # ratios of the runs made back to back (repetition i of each side), then their median: the
                # machine's load drifts over minutes, and neighbours see the same load
                pairs = list(zip(sides[a], sides[b]))
                ratio = {"ttft": median([x["first"]["ttft_s"] / y["first"]["ttft_s"] for x, y in pairs]),
                         "decode": median([x["first"]["decode_tokens_per_s"] / y["first"]["decode_tokens_per_s"]
                                           for x, y in pairs])}
                if "second" in sides[a][0]:
                    ratio["second_ttft"] = median([x["second"]["ttft_s"] / y["second"]["ttft_s"] for x, y in pairs])
                row["ratios"][f"{a} / {b}"] = ratio
        fp32, reference = row["sides"].get("paddle-fp32"), row["sides"].get("transformers")
        if fp32 and reference and not CASES[case].temperature:
            row["same_first_tokens"] = fp32["first_ids"] == reference["first_ids"]
        table[case] = row
    return {"cases": table, "decode_bound_tokens_per_s": bandwidth / sizes["decode_read_per_token"],
            # a step over bf16 weights reads half the bytes (the bf16 kernel path, llava_ui.model.kernels)
            "bf16_decode_bound_tokens_per_s": 2 * bandwidth / sizes["decode_read_per_token"]}


def markdown(report: dict) -> str:
    m, s = report["machine"], report["summary"]
    gb = 1e9
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gb']:.0f} GB; bf16 units: "
        f"{m.get('bf16_units') or 'none'}), {report['reps']} runs per side, medians; paddle "
        f"{m['versions']['paddle']}, paddlenlp {m['versions']['paddlenlp']}, torch {m['versions']['torch']}, "
        f"transformers {m['versions']['transformers']}.",
        "",
        "| case | side | precision | prompt tokens | first token | decode tok/s | peak RSS | RSS / fp32 weights |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, row in s["cases"].items():
        for side, r in row["sides"].items():
            second = f" (turn 2: {_f(r['second_ttft_s'], ' s', 2)})" if "second_ttft_s" in r else ""
            lines.append(f"| {case} | {side} | {r['precision']} | {r['prompt_tokens']} | {_f(r['ttft_s'], ' s', 2)}"
                         f"{second} | {_f(r['decode_tokens_per_s'], '', 2)} | {_f(r['peak_rss_bytes'] / gb, ' GB', 2)} "
                         f"| {_f(r['rss_ratio'], '×', 2)} |")
    lines += ["", "Ratios: medians of the per-repetition ratios (each run against the peer's run next to it).", "",
              "| case | pair | first token | decode |", "|---|---|---:|---:|"]
    for case, row in s["cases"].items():
        for pair, ratio in row["ratios"].items():
            lines.append(f"| {case} | {pair} | {_f(ratio['ttft'], '×', 2)} | {_f(ratio['decode'], '×', 2)} |")
    sizes = report["sizes"]
    lines += [
        "",
        f"fp32 weights: {sizes['model_fp32'] / gb:.2f} GB; one fp32 decode step reads "
        f"{sizes['decode_read_per_token'] / gb:.2f} GB; read bandwidth (numpy streaming sum over 2 GB, every core): "
        f"{report['bandwidth_bytes_per_s'] / gb:.1f} GB/s → fp32 decode bound {s['decode_bound_tokens_per_s']:.1f} "
        f"tokens/s, bf16 decode bound {s.get('bf16_decode_bound_tokens_per_s', 0):.1f} tokens/s.",
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
    ]
    for name, value, goal, ok in targets(report):
        lines.append(f"| {name} ({goal}) | {value} | {'yes' if ok else 'no'} |")
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[tuple[str, str, str, bool]]:
    """Issue 35's targets (and the fp32 ones before them), from the ratios of this run."""
    cases, out = report["summary"]["cases"], []

    def check(case, pair, measure, goal, at_most):
        ratio = cases.get(case, {}).get("ratios", {}).get(pair, {}).get(measure)
        if ratio is not None:
            ok = ratio <= goal if at_most else ratio >= goal
            out.append((f"{'first token' if measure == 'ttft' else 'decode'}, {case}, {pair}", f"{ratio:.2f}×",
                        f"{'≤' if at_most else '≥'} {goal}×", ok))

    for case in ("1-image", "4-images", "video-8"):
        check(case, "paddle / transformers", "ttft", 0.35, True)
        check(case, "paddle / transformers-bf16", "ttft", 0.8, True)
        check(case, "paddle-fp32 / transformers", "ttft", 1.0, True)
    for case in ("answer-256", "answer-256-t0.2"):
        check(case, "paddle / transformers", "decode", 2.0, False)
        check(case, "paddle / transformers-bf16", "decode", 1.5, False)
        check(case, "paddle-fp32 / transformers", "decode", 1.3, False)
        paddle = cases.get(case, {}).get("sides", {}).get("paddle")
        bound = report["summary"].get("bf16_decode_bound_tokens_per_s")
        if paddle and bound and "bf16" in str(paddle["precision"]):
            share = paddle["decode_tokens_per_s"] / bound
            out.append((f"decode, {case}, paddle, of the bf16 bandwidth bound", f"{share:.2f}", "≥ 0.6",
                        share >= 0.6))
    for case, row in cases.items():
        for side in ("paddle", "paddle-fp32"):
            if side in row["sides"]:
                r = row["sides"][side]["rss_ratio"]
                out.append((f"peak RSS / fp32 weights, {case}, {side}", f"{r:.2f}×", "≤ 1.3×", r <= 1.3))
    return out


def _f(value, unit: str = "", digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="subprocess runs per side and case (default 3)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--sides", default="paddle,transformers,transformers-bf16,paddle-fp32",
                        help="paddle (its default precision), paddle-fp32, paddle-int8 (--weights int8), "
                             "transformers (fp32), transformers-bf16")
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS,
                        help="where the random real-dimension checkpoints are (written on first use, 2×3.5 GB)")
    parser.add_argument("--device", default=None, help="cpu (default here) or gpu (transformers then uses cuda)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="latest", help="basename of the JSON and Markdown files")
    args = parser.parse_args(argv)
    import psutil

    cases = [c for c in args.cases.split(",") if c]
    sides = [s for s in args.sides.split(",") if s]
    dirs = ensure_checkpoints(args.checkpoints)
    sizes = weight_bytes(dirs["paddle"])
    bandwidths = [read_bandwidth()]
    runs: dict = {c: {s: [] for s in sides} for c in cases}
    for rep in range(args.reps):
        for case in cases:
            for side in sides:
                result = run_worker(side, case, dirs[engine_of(side)], args.device)
                runs[case][side].append(result)
                f = result["first"]
                print(f"rep {rep + 1}/{args.reps} {case:15s} {side:17s} first token {f['ttft_s']:6.2f}s "
                      f"decode {f['decode_tokens_per_s'] or 0:5.2f} tok/s peak RSS {result['peak_rss'] / 1e9:.2f} GB"
                      + (f" turn 2 first token {result['second']['ttft_s']:.2f}s" if "second" in result else ""),
                      flush=True)
    bandwidths.append(read_bandwidth())
    bandwidth = statistics.median(bandwidths)
    report = {
        "machine": {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
                    "cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
                    "memory_gb": psutil.virtual_memory().total / 2**30, "platform": platform.platform(),
                    "load_average": os.getloadavg(), "versions": versions(), "bf16_units": bf16_units()},
        "reps": args.reps, "device": args.device or "cpu", "sizes": sizes,
        "bandwidth_bytes_per_s": bandwidth, "bandwidth_samples": bandwidths, "runs": runs,
    }
    report["summary"] = summarise(runs, sizes, bandwidth)
    report["targets"] = [dict(zip(("target", "measured", "goal", "met"), t)) for t in targets(report)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

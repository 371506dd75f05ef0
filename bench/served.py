"""The served path at the real dimensions: memory and speed of `python app.py` (through /v1 and through the web
chat's own handlers) against `python -m llava_ui generate` doing the same work, in one run.

    .venv/bin/python bench/served.py                       # memory (8 and 16 frames), ten in a row, speed
    .venv/bin/python bench/served.py --frames 8 --repeat 3 --speed-reps 1

Cases:
- memory-N: a 4-second, 40-frame 320×240 clip. Through the API as its N sampled frames (N images in one request)
  and through the chat (`send` + `respond`, as the page calls them) as the video with N frames, each in a freshly
  started server; the command line does both (`--image` ×N, `--video --frames N`) in its own process. Peak RSS:
  the server's VmHWM, reset before the request (the model is already resident in both), against the command
  line's whole-process peak.
- in-a-row: `--repeat` API requests of N frames (two clips in turn, a new question each): the server's RSS after
  each, next to the sizes of its bounded caches.
- served: one image + a question, greedy, through the API, the chat and the command line (alternating,
  `--speed-reps` each): time to first token and decode tokens/s as the engine measured them, and the API's
  first token as its client saw it.
- concurrent: several chats at once through /v1 (`--concurrency 8`; one picture each, its features and prompt
  prefix cached by a first request, so the chats decode side by side from their first step): one alone, then 4
  and 8 at once (decode tokens/s each and in total, the engine's mean step time per batch size); then a chat
  with a new picture alone, and the same arriving while 4 others decode (its time to first token). Peak RSS per
  phase. Issue 35's targets: 4 at once ≥ 3.2× the solo total and each ≥ 0.8× solo, 8 at once ≥ 5×, the late
  arrival's first token ≤ 1.2× alone.
Writes bench/results/served.json and served.md (`--name` changes the basename).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from run import DEFAULT_CHECKPOINTS, cpu_model, ensure_checkpoints  # noqa: E402

QUESTION = "What happens in this clip?"
RSS_TARGET_BYTES = 0.3 * 2**30  # server peak at most the command line's + 0.3 GB (issue 35)
SPEED_TARGET = 0.05  # served within 5 % of the command line


def write_clip(path: Path, seed: int = 0, frames: int = 40, size=(320, 240), fps: int = 10) -> Path:
    """Moving shapes over a colour ramp: every frame differs."""
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(frames):
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        frame[:] = ((40 + 4 * i + 50 * seed) % 256, 80, (200 - 4 * i) % 256)
        cv2.circle(frame, (20 + 7 * i, 120), 30, (255, 255 - 6 * i, 6 * i), -1)
        cv2.rectangle(frame, (200, 20 + 4 * i), (260, 60 + 4 * i), (0, 200, 50 * seed % 256), -1)
        writer.write(frame)
    writer.release()
    return path


def frame_files(clip: Path, count: int, folder: Path) -> list[Path]:
    """The frames the app samples from the clip, as PNG files (what an API client would send)."""
    from llava_ui.chat.media import load_video

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(load_video(clip, count).frames):
        path = folder / f"{clip.stem}-{count}-{i:02d}.png"
        frame.image.save(path)
        paths.append(path)
    return paths


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS


class PeakPopen(subprocess.Popen):
    """Popen that reaps with wait4 and keeps the child's own peak RSS (RUSAGE_CHILDREN would be the largest child
    so far, not this one)."""

    def _try_wait(self, wait_flags):
        pid, status, usage = os.wait4(self.pid, wait_flags)
        if pid:
            self.peak_rss = usage.ru_maxrss * 1024
        return pid, status


def cli(model: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "llava_ui", "generate", "--model", str(model), "--temperature", "0", "--json", *args]
    proc = PeakPopen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"the command line failed ({proc.returncode}):\n{err[-3000:]}")
    record = json.loads(out.strip().splitlines()[-1])
    return {"stats": record["stats"], "peak_rss": proc.peak_rss}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(model: Path, log_path: Path, extra: list[str] = ()):
    """`python app.py --model M --eager` on a free port, once the model is loaded."""
    import httpx

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--model", str(model), "--eager", "--port", str(port), *extra],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}; see {log_path}")
            try:
                card = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["llava_ui"]
                if card["state"] == "ready":
                    break
                if card["state"] == "failed":
                    raise RuntimeError(f"the model failed to load: {card['error']}")
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not load the model within 900 s")
            time.sleep(2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def api_request(url: str, pid: int, images: list[Path], question: str, max_tokens: int) -> dict:
    """One streaming /v1 request: the engine's stats, the client's first token, the server's peak RSS."""
    reset_peak(pid)
    timed = timed_request(url, images, question, max_tokens, images_first=False)
    return {"stats": timed["stats"], "client_ttft_s": timed["first"] and timed["first"] - timed["started"],
            "peak_rss": proc_status(pid)["VmHWM"], "rss_after": proc_status(pid)["VmRSS"]}


def chat_request(url: str, pid: int, files: list[Path], frames: int, question: str, max_tokens: int) -> dict:
    """The web chat's own handlers, as the page calls them: `send` (uploads, video sampling) then `respond`."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    reset_peak(pid)
    client.predict({"text": question, "files": [handle_file(str(f)) for f in files]}, frames, api_name="/send")
    outputs = client.predict("", 0, 1.0, 0, 1.0, max_tokens, "0", "", False, False, False,  # no inspector views
                             api_name="/respond")
    line = next(o for o in outputs if isinstance(o, str) and "first token" in o)
    client.close()
    return {"stats": parse_stats_line(line), "peak_rss": proc_status(pid)["VmHWM"],
            "rss_after": proc_status(pid)["VmRSS"]}


def parse_stats_line(line: str) -> dict:
    """The chat's stats line ("24 tokens · … · first token 6.81 s · 6.4 tokens/s · prompt …") as numbers."""
    ttft = re.search(r"first token ([\d.]+) s", line)
    rate = re.search(r"([\d.]+) tokens/s", line)
    tokens = re.search(r"(\d+) tokens ·", line)
    return {"ttft_s": float(ttft.group(1)) if ttft else None,
            "decode_tokens_per_s": float(rate.group(1)) if rate else None,
            "generated_tokens": int(tokens.group(1)) if tokens else None}


def caches(url: str) -> dict:
    import httpx

    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["llava_ui"]["caches"]


def gb(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**30:.2f}"


CONCURRENT_TARGETS = {"total_4": 3.2, "each_4": 0.8, "total_8": 5.0, "late_ttft": 1.2}  # issue 35


def timed_request(url: str, images: list[Path], question: str, max_tokens: int, images_first: bool = True,
                  on_first=None) -> dict:
    """One streaming /v1 request as a client sees it: the engine's stats and the client's clock at the start, the
    first and the last token. Pictures first by default: chats on the same picture share the prompt's prefix."""
    import httpx

    pictures = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]
    text = [{"type": "text", "text": question}]
    content = pictures + text if images_first else text + pictures
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    started, first, details = time.perf_counter(), None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
                if on_first is not None:
                    on_first()
            details = chunk.get("llava_ui") or details
    return {"stats": details["stats"], "started": started, "first": first, "ended": time.perf_counter()}


def at_once(calls: list) -> list:
    """Run the calls in threads released together; results in order."""
    results, barrier = [None] * len(calls), threading.Barrier(len(calls))

    def one(i):
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results


def kv_bytes(stats: dict, element: int = 4, layers: int = 24, kv_heads: int = 16, head_dim: int = 64) -> int:
    """A chat's KV cache at the real dimensions (`element` bytes a value: 2 where the bf16 kernels keep it in
    bf16): its positions rounded up as qwen2 reserves them."""
    positions = stats["prompt_tokens"] + stats["generated_tokens"]
    return 2 * layers * kv_heads * head_dim * element * (-(-positions // 64) * 64)


def decode_rates(results: list) -> dict:
    rates = [r["stats"]["decode_tokens_per_s"] for r in results]
    tokens = sum(r["stats"]["generated_tokens"] - 1 for r in results)
    window = max(r["ended"] for r in results) - min(r["first"] for r in results)
    return {"each": rates, "total": sum(rates), "wall_total": tokens / window if window > 0 else None,
            "batch_max": max(r["stats"].get("decode_batch_max") or 1 for r in results)}


def concurrent_case(model: Path, work: Path, new_image, args) -> dict:
    import httpx

    extra = ["--concurrency", "8", "--queue-size", "16"] + (["--dtype", args.dtype] if args.dtype else []) + (
        ["--weights", args.weights] if args.weights else [])
    out = {"max_new_tokens": args.concurrent_tokens}
    shared = new_image(100)
    with server(model, work / "server-concurrent.log", extra) as (url, pid):
        def status():  # the model card's llava_ui fields (the engine's status)
            return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["llava_ui"]

        card = status()
        out["precision"], out["weight_layout"] = card["precision"], card["weight_layout"]
        out["resident"] = proc_status(pid)["VmRSS"]
        kv_element = 2 if (card.get("options") or {}).get("kv_cache") == "bfloat16" else 4  # (the CPU kernels')
        timed_request(url, [shared], "Describe this picture.", 2)  # its features and prompt prefix are cached
        ask = lambda i, tokens=args.concurrent_tokens: (
            lambda: timed_request(url, [shared], f"Describe this picture. ({i})", tokens))
        for count in (1, 4, 8):
            reset_peak(pid)
            results = at_once([ask(i + 10 * count) for i in range(count)])
            out[f"at_once_{count}"] = {**decode_rates(results), "peak_rss": proc_status(pid)["VmHWM"],
                                       "caches": status()["caches"],
                                       "kv_bytes": sum(kv_bytes(r["stats"], kv_element) for r in results)}
            print(f"concurrent {count}: " + json.dumps({k: v for k, v in out[f"at_once_{count}"].items()
                                                        if k != "each"}), flush=True)
        out["decode_steps"] = status()["decode_steps"]
        reset_peak(pid)
        alone = [timed_request(url, [new_image(seed)], "What is in this picture?", 4)["stats"]["ttft_s"]
                 for seed in (200, 202)]  # twice: a new picture's first token varies from run to run
        out["late_alone_runs_s"], out["late_alone_ttft_s"] = alone, statistics.median(alone)
        # four chats decoding long answers; the fifth, with a new picture, arrives once they all decode. The new
        # pictures above took the prefix cache's room (one 3k-position prompt is 0.6 GB of its 1 GB): the shared
        # picture's prompt is cached again first, so the four start decoding at once instead of prefilling
        timed_request(url, [shared], "Describe this picture.", 2)
        decoding, started = [None] * 4, threading.Semaphore(0)

        def decoder(i):
            decoding[i] = timed_request(url, [shared], f"Describe this picture. ({i + 50})", 4 * args.concurrent_tokens,
                                        on_first=started.release)

        threads = [threading.Thread(target=decoder, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        for _ in threads:
            started.acquire()
        time.sleep(args.late_after)
        late = timed_request(url, [new_image(201)], "What is in this picture?", 4)
        [t.join() for t in threads]
        out["late_with_4_ttft_s"] = late["stats"]["ttft_s"]
        out["late_arrived_while_decoding"] = all(d["first"] is not None and d["first"] < late["started"] and
                                                 d["ended"] > late["first"] for d in decoding)
        out["late_peak_rss"] = proc_status(pid)["VmHWM"]
        print(f"late arrival: alone {out['late_alone_ttft_s']:.2f} s, with 4 decoding {out['late_with_4_ttft_s']:.2f} s"
              f" (they decoded throughout: {out['late_arrived_while_decoding']})", flush=True)
    solo = out["at_once_1"]["total"]
    out["ratios"] = {"total_4": out["at_once_4"]["total"] / solo, "each_4": min(out["at_once_4"]["each"]) / solo,
                     "total_8": out["at_once_8"]["total"] / solo,
                     "late_ttft": out["late_with_4_ttft_s"] / out["late_alone_ttft_s"]}
    out["met"] = {k: (v <= CONCURRENT_TARGETS[k] if k == "late_ttft" else v >= CONCURRENT_TARGETS[k])
                  for k, v in out["ratios"].items()}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    parser.add_argument("--frames", default="8,16", help="frame counts of the memory case (default 8,16)")
    parser.add_argument("--repeat", type=int, default=10, help="requests in a row (default 10)")
    parser.add_argument("--speed-reps", type=int, default=3, help="repetitions per path of the speed case")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--skip", default="", help="cases to skip: memory,in-a-row,served,concurrent")
    parser.add_argument("--only", default="", help="run only these cases (comma-separated)")
    parser.add_argument("--concurrent-tokens", type=int, default=48, help="answer length in the concurrent case")
    parser.add_argument("--late-after", type=float, default=2.0,
                        help="seconds after the four chats' first tokens that the late one arrives (concurrent case)")
    parser.add_argument("--weights", default=None, help="the server's --weights in the concurrent case (int8)")
    parser.add_argument("--dtype", default=None, help="the server's --dtype in the concurrent case (default: "
                                                      "the app's default)")
    parser.add_argument("--name", default="served", help="basename of the result files")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        skip = {"memory", "in-a-row", "served", "concurrent"} - set(args.only.split(","))
    model = ensure_checkpoints(args.checkpoints)["paddle"]
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "llava_ui_bench_served"
    work.mkdir(parents=True, exist_ok=True)
    clips = [write_clip(work / f"clip{seed}.mp4", seed) for seed in (0, 1)]
    from cases import picture

    def new_image(seed: int) -> Path:  # the same size (the same work) with other pixels: no feature cache hit
        path = work / f"picture{seed}.png"
        picture(seed).save(path)
        return path
    counts = [int(n) for n in args.frames.split(",") if n]
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
              "cores": len(os.sched_getaffinity(0)), "model": str(model), "max_new_tokens": args.max_new_tokens}
    print(f"CPU: {report['cpu']} ({report['cores']} cores)", flush=True)

    memory = {}
    if "memory" not in skip:
        for n in counts:
            frames = frame_files(clips[0], n, work / "frames")
            print(f"memory-{n}: command line ...", flush=True)
            cli_images = cli(model, [a for f in frames for a in ("--image", str(f))] + [
                "--prompt", QUESTION, "--max-new-tokens", str(args.max_new_tokens)])
            cli_video = cli(model, ["--video", str(clips[0]), "--frames", str(n), "--prompt", QUESTION,
                                    "--max-new-tokens", str(args.max_new_tokens)])
            print(f"memory-{n}: server ...", flush=True)
            with server(model, work / f"server-memory-{n}-api.log") as (url, pid):  # a fresh server per path:
                resident = proc_status(pid)["VmRSS"]  # no cache of the other path's request in it
                api = api_request(url, pid, frames, QUESTION, args.max_new_tokens)
            with server(model, work / f"server-memory-{n}-chat.log") as (url, pid):
                chat = chat_request(url, pid, [clips[0]], n, QUESTION, args.max_new_tokens)
            memory[n] = {"server_resident_before": resident, "api": api, "chat": chat,
                         "cli_images": cli_images, "cli_video": cli_video,
                         "api_minus_cli": api["peak_rss"] - cli_images["peak_rss"],
                         "chat_minus_cli": chat["peak_rss"] - cli_video["peak_rss"]}
            print(json.dumps({k: memory[n][k] for k in ("api_minus_cli", "chat_minus_cli")}), flush=True)
    report["memory"] = memory

    row = []
    if "in-a-row" not in skip:
        n = counts[0]
        sets = [frame_files(clip, n, work / "frames") for clip in clips]
        with server(model, work / "server-in-a-row.log") as (url, pid):
            for i in range(args.repeat):
                result = api_request(url, pid, sets[i % 2], f"{QUESTION} (question {i + 1})", 4)
                row.append({"rss_after": result["rss_after"], "peak_rss": result["peak_rss"], "caches": caches(url)})
                print(f"in-a-row {i + 1}: RSS {gb(result['rss_after'])} GB, peak {gb(result['peak_rss'])} GB, "
                      f"caches {row[-1]['caches']}", flush=True)
    report["in_a_row"] = row

    speed = {"api": [], "chat": [], "cli": []}
    if "served" not in skip:
        with server(model, work / "server-speed.log") as (url, pid):
            for rep in range(args.speed_reps):
                question = "Describe this picture."  # a new picture each time: no cache shortcut on any path
                speed["cli"].append(cli(model, ["--image", str(new_image(3 * rep)), "--prompt", question,
                                                "--max-new-tokens", str(args.max_new_tokens)]))
                speed["api"].append(api_request(url, pid, [new_image(3 * rep + 1)], question, args.max_new_tokens))
                speed["chat"].append(chat_request(url, pid, [new_image(3 * rep + 2)], 1, question,
                                                  args.max_new_tokens))
                print(f"served rep {rep + 1}: " + ", ".join(
                    f"{side} {s[-1]['stats']['ttft_s']:.2f} s / {s[-1]['stats']['decode_tokens_per_s']:.2f} tok/s"
                    for side, s in speed.items()), flush=True)
    report["served"] = speed
    report["concurrent"] = None if "concurrent" in skip else concurrent_case(model, work, new_image, args)
    summary = summarise(report)
    report["summary"] = summary
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(report: dict) -> dict:
    out = {}
    for n, m in report["memory"].items():
        out[f"memory-{n}"] = {"api_minus_cli_gb": m["api_minus_cli"] / 2**30, "chat_minus_cli_gb": m["chat_minus_cli"] / 2**30,
                              "within_target": max(m["api_minus_cli"], m["chat_minus_cli"]) <= RSS_TARGET_BYTES}
    if report["in_a_row"]:
        rss = [r["rss_after"] for r in report["in_a_row"]]
        out["in_a_row"] = {"first_gb": rss[0] / 2**30, "last_gb": rss[-1] / 2**30,
                           "growth_after_second_gb": (max(rss[1:]) - rss[1]) / 2**30 if len(rss) > 1 else 0.0}
    speed = report["served"]
    if speed["cli"]:
        cli_ttft = median([r["stats"]["ttft_s"] for r in speed["cli"]])
        cli_rate = median([r["stats"]["decode_tokens_per_s"] for r in speed["cli"]])
        for side in ("api", "chat"):
            # ratios of back-to-back pairs (the same repetition), then their median: machine drift hits both
            pairs = list(zip(speed[side], speed["cli"]))
            ttft = median([a["stats"]["ttft_s"] / c["stats"]["ttft_s"] for a, c in pairs])
            rate = median([a["stats"]["decode_tokens_per_s"] / c["stats"]["decode_tokens_per_s"] for a, c in pairs])
            out[f"served-{side}"] = {"ttft_ratio": ttft, "decode_ratio": rate,
                                     "within_target": ttft <= 1 + SPEED_TARGET and rate >= 1 - SPEED_TARGET}
        out["served-cli"] = {"ttft_s": cli_ttft, "decode_tokens_per_s": cli_rate}
    return out


def markdown(report: dict) -> str:
    lines = [f"# Served path at the real dimensions ({report['date']})", "",
             f"CPU: {report['cpu']}, {report['cores']} cores; random-weight real-size checkpoint; the app's default "
             f"precision unless a section says otherwise; {report['max_new_tokens']} new tokens (greedy) in the "
             "memory and speed cases.", ""]
    if report["memory"]:
        lines += ["## Peak RSS: server vs command line, same work (GB)", "",
                  "| frames | server resident before | API peak | CLI `--image`×N peak | chat peak | CLI `--video` peak "
                  "| API − CLI | chat − CLI |", "|---|---|---|---|---|---|---|---|"]
        for n, m in report["memory"].items():
            lines.append(f"| {n} | {gb(m['server_resident_before'])} | {gb(m['api']['peak_rss'])} | "
                         f"{gb(m['cli_images']['peak_rss'])} | {gb(m['chat']['peak_rss'])} | "
                         f"{gb(m['cli_video']['peak_rss'])} | {m['api_minus_cli'] / 2**30:+.2f} | "
                         f"{m['chat_minus_cli'] / 2**30:+.2f} |")
        lines += ["", "Target: server ≤ command line + 0.3 GB.", ""]
    if report["in_a_row"]:
        lines += ["## Requests in a row through /v1 (RSS after each, GB; caches in MB)", "",
                  "| request | RSS after | peak | feature cache | prefix cache |", "|---|---|---|---|---|"]
        for i, r in enumerate(report["in_a_row"], 1):
            c = r["caches"]
            lines.append(f"| {i} | {gb(r['rss_after'])} | {gb(r['peak_rss'])} | {c['feature_bytes'] / 2**20:.0f} "
                         f"({c['feature_entries']}) | {c['prefix_bytes'] / 2**20:.0f} ({c['prefix_entries']}) |")
        lines.append("")
    speed = report["served"]
    if speed["cli"]:
        lines += ["## Served speed vs the command line (one image; medians; ratios: median of back-to-back pairs)", "",
                  "| path | first token (s) | decode (tokens/s) | vs CLI first token | vs CLI decode |",
                  "|---|---|---|---|---|"]
        s = report["summary"]
        cli_row = s["served-cli"]
        lines.append(f"| command line | {cli_row['ttft_s']:.2f} | {cli_row['decode_tokens_per_s']:.2f} | 1.00 | 1.00 |")
        for side in ("api", "chat"):
            ttft = median([r["stats"]["ttft_s"] for r in speed[side]])
            rate = median([r["stats"]["decode_tokens_per_s"] for r in speed[side]])
            lines.append(f"| {side} | {ttft:.2f} | {rate:.2f} | {s[f'served-{side}']['ttft_ratio']:.3f} | "
                         f"{s[f'served-{side}']['decode_ratio']:.3f} |")
        client = median([r["client_ttft_s"] for r in speed["api"]])
        lines += ["", f"API first token as its client saw it (upload, decode and HTTP included): {client:.2f} s.",
                  "Target: within 5 %.", ""]
    c = report.get("concurrent")
    if c:
        lines += [f"## Concurrent chats through /v1 ({c['precision']}, weights {c['weight_layout']}, "
                  f"{c['max_new_tokens']} greedy tokens each)", "",
                  "| chats at once | decode tokens/s each | total (sum) | total (wall clock) | vs one alone | "
                  "most sharing a step | peak RSS (GB) |", "|---|---|---|---|---|---|---|"]
        solo, memory = c["at_once_1"]["total"], []
        for count in (1, 4, 8):
            r = c[f"at_once_{count}"]
            memory.append(f"{count} at once: peak {gb(r['peak_rss'])} GB = resident {gb(c['resident'])} + the chats' "
                          f"KV caches {gb(r['kv_bytes'])} + prefix cache {gb(r['caches']['prefix_bytes'])} + feature "
                          f"cache {gb(r['caches']['feature_bytes'])} + "
                          f"{gb(r['peak_rss'] - c['resident'] - r['kv_bytes'] - r['caches']['prefix_bytes'] - r['caches']['feature_bytes'])} other")
            wall = f"{r['wall_total']:.2f}" if r["wall_total"] else "–"
            lines.append(f"| {count} | {', '.join(f'{x:.2f}' for x in r['each'])} | {r['total']:.2f} | {wall} | "
                         f"{r['total'] / solo:.2f}x | {r['batch_max']} | {gb(r['peak_rss'])} |")
        steps = ", ".join(f"{size} rows {v['mean_ms']:.0f} ms ({v['steps']})" for size, v in c["decode_steps"].items())
        lines += ["", f"Server resident before: {gb(c['resident'])} GB. Mean decode step per batch size (steps): "
                      f"{steps}.", "", "Peak RSS (GB), where it goes: " + "; ".join(memory) + ".", "",
                  f"Late arrival (a new picture): first token {c['late_alone_ttft_s']:.2f} s alone (runs: "
                  f"{', '.join(f'{t:.1f}' for t in c['late_alone_runs_s'])} s), "
                  f"{c['late_with_4_ttft_s']:.2f} s while 4 chats decode ({c['ratios']['late_ttft']:.2f}x; the four "
                  f"decoded throughout: {c['late_arrived_while_decoding']}); peak RSS {gb(c['late_peak_rss'])} GB.", "",
                  "Targets: " + ", ".join(f"{k} {v:.2f} ({'met' if c['met'][k] else 'missed'}; target "
                                          f"{'≤' if k == 'late_ttft' else '≥'} {CONCURRENT_TARGETS[k]})"
                                          for k, v in c["ratios"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

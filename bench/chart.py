"""Draw docs/images/performance.png from bench/run.py results: `python bench/chart.py [RESULT.json ...] [--out PNG]`.

Per case, the time to the first token and the decode speed of each side, with the machine and the files named
under the title; several files are drawn as one (a case in two: the later file's). Without files, the newest
result bench/run.py wrote in bench/results (by the date it records) is drawn. Drawn with Pillow (already a
dependency), so the chart needs nothing the project does not install.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COLOURS = {"paddle": (79, 70, 229), "paddle-fp32": (129, 140, 248), "paddle-int8": (13, 148, 136),
           "transformers": (234, 88, 12), "transformers-bf16": (249, 115, 22), "transformers-fp32": (253, 186, 116)}
OTHER = (120, 120, 120)
PANELS = (("ttft_s", "time to first token (s, lower is better)", "{:.1f} s"),
          ("decode_tokens_per_s", "decode speed (tokens/s, higher is better)", "{:.1f}"))


def run_results() -> list[Path]:
    """bench/run.py's results in bench/results, oldest first by the date each records."""
    found = []
    for path in RESULTS.glob("*.json"):
        result = json.loads(path.read_text())
        if isinstance(result, dict) and "summary" in result and "machine" in result:
            found.append((result["machine"]["date"], path))
    return [path for _, path in sorted(found)]


def merged(paths: list[Path]) -> dict:
    """One result holding every case of `paths` (a later file's case replaces an earlier one's)."""
    results = [json.loads(path.read_text()) for path in paths]
    cases = {}
    for result in results:
        cases.update(result["summary"]["cases"])
    return {**results[-1], "summary": {"cases": cases}, "reps": max(result["reps"] for result in results)}


def font(size: int):
    return ImageFont.load_default(size=size)


def draw(result: dict, sources: str, out: Path) -> None:
    cases = result["summary"]["cases"]
    sides = sorted(dict.fromkeys(side for case in cases.values() for side in case["sides"]),
                   key=lambda side: (not side.startswith("paddle"), side))
    precision = {side: found["precision"] for case in cases.values() for side, found in case["sides"].items()}
    width, bar, gap, left = 900, 18, 14, 150
    rows = len(cases) * (len(sides) * bar + gap)
    height = 100 + len(PANELS) * (28 + rows + 22)
    image = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(image)
    machine = result["machine"]
    pen.text((20, 16), "LLaVA-NeXT-Interleave 0.5B at the real size, CPU", fill="black", font=font(20))
    pen.text((20, 44), f"{machine['cpu']}, {machine['cores']} cores, bf16 units: {machine.get('bf16_units') or 'none'}"
                       f" · {machine['date'][:10]} · {result['reps']} run(s) per side, medians · bench/results: {sources}",
             fill=(90, 90, 90), font=font(12))
    x = 20
    for side in sides:  # the legend
        named = f"{side}: {precision[side]}"
        pen.rectangle((x, 70, x + 14, 84), fill=COLOURS.get(side, OTHER))
        pen.text((x + 20, 70), named, fill="black", font=font(13))
        x += 40 + int(pen.textlength(named, font=font(13)))
    y = 100
    for key, label, shown in PANELS:
        pen.text((20, y), label, fill="black", font=font(15))
        y += 28
        top = max(case["sides"][side][key] for case in cases.values() for side in case["sides"])
        for name, case in cases.items():
            pen.text((20, y + (len(sides) * bar) // 2 - 8), name, fill="black", font=font(13))
            for side in sides:
                if side in case["sides"]:
                    value = case["sides"][side][key]
                    length = int((width - left - 110) * value / top)
                    pen.rectangle((left, y, left + max(length, 1), y + bar - 3), fill=COLOURS.get(side, OTHER))
                    pen.text((left + length + 6, y + 1), shown.format(value), fill="black", font=font(12))
                y += bar
            y += gap
        y += 22
    image.quantize(colors=64).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, help="bench/run.py results (default: the newest)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "performance.png")
    args = parser.parse_args()
    paths = args.results or run_results()[-1:]
    names = ", ".join(path.name for path in paths)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(merged(paths), names, args.out)
    print(f"{args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} from {names}")


if __name__ == "__main__":
    main()

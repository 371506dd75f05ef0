"""What the research inspector's extras cost: decode speed with token probabilities off and on (issue 36: the fast
path unchanged when nothing is asked, not measurably slower when they are), and the time of the attention pass
read after an answer.

    .venv/bin/python bench/inspector_cost.py                      # the real-size random checkpoint, fp32
    .venv/bin/python bench/inspector_cost.py --model DIR --rounds 3

One process, one engine; the same greedy answer (one picture + a question) is asked with logprobs off, K = 5 and
K = 20 in turn, `--rounds` times, so that drifts of a shared machine hit every setting alike. Prints and writes
bench/results/<name>.json and .md: per setting the median decode tokens/s and its ratio to "off"; then the
answer's total time without and with the attention pass.
"""
from __future__ import annotations

import argparse
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

SETTINGS = {"off": None, "K=5": 5, "K=20": 20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint folder (default: the bench's real one)")
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--name", default="inspector-cost")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    from llava_ui.backends.local import Engine
    from llava_ui.chat.conversation import Conversation
    from llava_ui.config import GenerationSettings

    model = args.model or ensure_checkpoints(args.checkpoints)["paddle"]
    engine = Engine(str(model), dtype=args.dtype, image_mode="flat").load()
    engine.compute.batch_limit = 1  # one stream, as the command line runs

    def answer(logprobs=None, attention=False):
        conversation = Conversation()
        conversation.add_user_files("Describe this picture.", [str(ROOT / "assets" / "shapes_before.png")])
        settings = GenerationSettings(max_new_tokens=args.tokens, temperature=0, logprobs=logprobs,
                                      attention=attention)
        began = time.perf_counter()
        result = engine.generate(conversation, settings)
        if len(result.token_ids) != args.tokens:
            raise SystemExit(f"the answer stopped at {len(result.token_ids)} tokens; pick another --tokens")
        return result, time.perf_counter() - began  # (the Result's total_s ends before the attention pass)

    answer()  # warm-up
    speeds = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, k in SETTINGS.items():
            speeds[name].append(answer(k)[0].stats.decode_tokens_per_s)
    (_, plain), (_, looked) = answer(), answer(attention=True)
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_model(), "model": str(model), "dtype": args.dtype, "tokens": args.tokens,
              "decode_tokens_per_s": speeds, "median": medians,
              "answer_s": plain, "answer_with_attention_s": looked}
    lines = [f"# Inspector extras: cost ({record['cpu']}, {args.dtype}, {args.tokens} tokens, {args.rounds} rounds)",
             "", "| logprobs | median decode tokens/s | vs off | every round |", "|---|---|---|---|"]
    for name, values in speeds.items():
        lines.append(f"| {name} | {medians[name]:.2f} | {medians[name] / medians['off']:.3f} | "
                     f"{', '.join(f'{v:.2f}' for v in values)} |")
    lines += ["", f"Answer {plain:.2f} s; with the attention pass {looked:.2f} s (the prompt's prefix cached in both)."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

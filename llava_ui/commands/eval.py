"""`eval`: the model card's evaluation (LLaVA-Interleave-Bench) on any backend, resumable."""
from __future__ import annotations

import os
import sys
import time

from llava_ui.engine.scheduler import batching_summary
from llava_ui.commands.common import HelpFormatter, add_log_level, add_model_arguments, make_backend
from llava_ui.eval.answerers import (
    TRACE_FILE,
    checkpoint_repetition_penalty,
    engine_answerer,
    model_name,
    skipping_unanswerable,
)
from llava_ui.eval.benchmark import EVAL_MAX_NEW_TOKENS, add_eval_arguments, run_evaluation


def add_eval_command(sub) -> None:
    parser = sub.add_parser("eval", help="run the model card's evaluation (LLaVA-Interleave-Bench)",
                            formatter_class=HelpFormatter)
    add_model_arguments(parser, image_mode=False)  # eval has its own --image-mode, default eval
    add_log_level(parser)
    add_eval_arguments(parser)
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    backend = make_backend(args, batch_slots=max(1, args.parallel))
    compute = getattr(backend, "compute", None)  # the local engine's compute thread (None for a remote one)
    backend.load()
    os.makedirs(args.out, exist_ok=True)
    penalty = checkpoint_repetition_penalty(args.model) if args.backend == "local" else 1.0
    if penalty != 1.0:
        print(f"decoding greedily with the repetition_penalty {penalty} of {args.model}/generation_config.json, "
              "as the reference's transformers generate() did", file=sys.stderr)
    answerer = engine_answerer(backend, args.image_mode, os.path.join(args.out, TRACE_FILE), penalty)
    if compute is not None:
        compute.steps.clear()
        compute.other_s = 0.0
    problems = []
    started = time.perf_counter()
    run_evaluation(args.data, args.split, args.out, skipping_unanswerable(answerer, problems), limit=args.limit,
                   model_id=model_name(backend.status().get("model") or args.model), image_mode=args.image_mode,
                   parallel=args.parallel)
    if answerer.turns:
        print("\n" + timing_line(answerer.turns, time.perf_counter() - started, args.parallel,
                                 compute and batching_summary(compute.steps, compute.other_s)) +
              f"; prompts in {os.path.join(args.out, TRACE_FILE)}")
    if problems:
        print(f"{len(problems)} turn{'s' * (len(problems) != 1)} could not be put to the model and scored as wrong "
              "(see the messages above)")
    return 0


def timing_line(turns: list, seconds: float, parallel: int, batching: dict | None) -> str:
    """The closing line: turns, wall-clock time, tokens; with --parallel, how many shared a decode step and the
    speed-up over one sample at a time (estimated from the engine's own solo and batched step times)."""
    tokens = sum(t[1] for t in turns)
    at_limit = sum(1 for t in turns if t[2] == "length")
    line = (f"{len(turns)} turns answered in {seconds:,.0f} s ({seconds / len(turns):.2f} s per turn, "
            f"{tokens / len(turns):.0f} tokens on average, {tokens / seconds:.1f} tokens/s; {at_limit} hit the "
            f"{EVAL_MAX_NEW_TOKENS}-token limit)")
    if parallel > 1 and batching:
        line += (f"; {parallel} at once: a decode step shared by {batching['mean_batch']:.1f} samples on average "
                 f"({batching['solo_step_s'] * 1000:.0f} ms alone, {batching['usual_step_s'] * 1000:.0f} ms for "
                 f"{batching['usual_batch']}), {batching['speedup']:.2f}x the speed of one at a time")
    elif parallel > 1:
        line += f"; {parallel} at once"
    return line

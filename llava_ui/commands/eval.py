"""`eval`: the model card's evaluation (LLaVA-Interleave-Bench) on any backend, resumable."""
from __future__ import annotations

import os
import sys

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
    backend = make_backend(args)
    backend.load()
    os.makedirs(args.out, exist_ok=True)
    penalty = checkpoint_repetition_penalty(args.model) if args.backend == "local" else 1.0
    if penalty != 1.0:
        print(f"decoding greedily with the repetition_penalty {penalty} of {args.model}/generation_config.json, "
              "as the reference's transformers generate() did", file=sys.stderr)
    answerer = engine_answerer(backend, args.image_mode, os.path.join(args.out, TRACE_FILE), penalty)
    problems = []
    run_evaluation(args.data, args.split, args.out, skipping_unanswerable(answerer, problems), limit=args.limit,
                   model_id=model_name(backend.status().get("model") or args.model), image_mode=args.image_mode)
    if answerer.turns:
        seconds = sum(t[0] for t in answerer.turns)
        at_limit = sum(1 for t in answerer.turns if t[2] == "length")
        print(f"\n{len(answerer.turns)} turns answered in {seconds:,.0f} s ({seconds / len(answerer.turns):.2f} s per "
              f"turn, {sum(t[1] for t in answerer.turns) / len(answerer.turns):.0f} tokens on average; {at_limit} hit "
              f"the {EVAL_MAX_NEW_TOKENS}-token limit); prompts in {os.path.join(args.out, TRACE_FILE)}")
    if problems:
        print(f"{len(problems)} turn{'s' * (len(problems) != 1)} could not be put to the model and scored as wrong "
              "(see the messages above)")
    return 0

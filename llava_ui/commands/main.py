"""`python -m llava_ui serve|generate|eval|replay|check|random-checkpoint ...`.

Answers stream to stdout; progress goes to stderr; a user error exits with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import sys

from llava_ui.commands.common import HelpFormatter, configure_logging, version_line
from llava_ui.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    # deferred: these import the local engine (Paddle); `llava-ui serve` in a light front end has no Paddle
    from llava_ui.commands.check import add_check_command
    from llava_ui.commands.eval import add_eval_command
    from llava_ui.commands.generate import add_generate_command
    from llava_ui.commands.replay import add_replay_command

    parser = argparse.ArgumentParser(prog="llava-ui", formatter_class=HelpFormatter,
                                     description="LLaVA-NeXT-Interleave on PaddlePaddle: serve, generate, evaluate "
                                                 "(also python -m llava_ui); every command has --help")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="the web chat + OpenAI-compatible API (the flags of python app.py)")
    add_generate_command(sub)
    add_eval_command(sub)
    add_replay_command(sub)
    add_check_command(sub)
    sub.add_parser("random-checkpoint", help="write a random-weight checkpoint (tests, offline demos)")
    return parser


def _serve(argv) -> int:
    from llava_ui.commands.serve import main  # deferred: the other commands need no Gradio

    main(argv)
    return 0


def _random_checkpoint(argv) -> int:
    from llava_ui.checkpoints.random import main  # deferred: writing checkpoints needs no model code

    main(argv)
    return 0


PASSED_ON = {"serve": _serve, "random-checkpoint": _random_checkpoint}  # commands that parse their own flags


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in PASSED_ON:
            return PASSED_ON[argv[0]](argv[1:])
        args = build_parser().parse_args(argv)
        configure_logging(args.log_level)
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cli() -> None:
    """The `llava-ui` console command."""
    sys.exit(main())

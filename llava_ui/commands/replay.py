"""`replay`: re-run a conversation exported from the inspector and say, turn by turn, whether the answer is the same."""
from __future__ import annotations

import json
import sys

from llava_ui.backends.base import TokenLogprob
from llava_ui.chat import export_arrays
from llava_ui.chat.conversation import Conversation
from llava_ui.chat.export import FORMAT, import_turn
from llava_ui.commands.common import HelpFormatter, add_log_level, add_model_arguments, make_backend
from llava_ui.config import GenerationSettings
from llava_ui.errors import UserError


def replay(export: dict, backend, out=None, arrays: dict | None = None) -> list[bool]:
    """Re-run every turn; `arrays`: the export's inspector arrays (export_arrays.load), compared when given.
    A turn counts as the same when its answer is, and its arrays are within their tolerances."""
    out = out or sys.stdout  # looked up per call: a default bound at import would outlive a redirected stdout
    if export.get("format") != FORMAT:
        raise UserError(f"not a conversation export (format {export.get('format')!r}, expected {FORMAT!r})")
    conversation = Conversation(system=export.get("system"))
    same = []
    for n, entry in enumerate(export["turns"], 1):
        text, pictures, video = import_turn(entry)
        conversation.add_user(text, pictures, video)
        recorded = dict(entry["settings"])
        recorded["stop"] = tuple(recorded.get("stop") or ())
        final = backend.generate(conversation, GenerationSettings(**recorded), image_mode=export.get("image_mode"))
        match = final.text == entry.get("answer")
        same.append(match)
        out.write(f"turn {n}: {'same answer' if match else 'DIFFERENT answer'}\n{final.text}\n")
        recorded_logprobs = (entry.get("output") or {}).get("logprobs")
        if recorded_logprobs is not None and final.logprobs is not None:
            out.write(logprobs_line(recorded_logprobs, final.logprobs) + "\n")
        keys = (entry.get("output") or {}).get("arrays")
        if keys and arrays is not None:
            lines = export_arrays.compare(keys, arrays, final)
            out.write("".join(line + "\n" for line in lines))
            same[-1] = match and export_arrays.within(lines)
        out.write("\n")
        conversation.turns[-1].answer = entry.get("answer") if entry.get("answer") is not None else final.text
    return same


def logprobs_line(recorded: list[dict], replayed: list[TokenLogprob]) -> str:
    """How far the replayed token probabilities are from the recorded ones, over the tokens both have."""
    pairs = [(r["logprob"], t.logprob) for r, t in zip(recorded, replayed) if r["token_id"] == t.token_id]
    if not pairs:
        return "token probabilities: no token in common with the recorded answer"
    worst = max(abs(a - b) for a, b in pairs)
    return f"token probabilities: {len(pairs)} tokens compared, largest log-probability difference {worst:.2e}"


def add_replay_command(sub) -> None:
    parser = sub.add_parser("replay", help="re-run an exported conversation and compare the answers",
                            formatter_class=HelpFormatter)
    parser.add_argument("export", help="JSON file exported from the web UI's inspector")
    add_model_arguments(parser)
    add_log_level(parser)
    parser.set_defaults(func=cmd_replay, model=None)


def cmd_replay(args) -> int:
    try:
        with open(args.export) as f:
            export = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {args.export}: {err}") from None
    args.model = args.model or export.get("model")
    args.image_mode = args.image_mode or export.get("image_mode")
    args.dtype = args.dtype or export.get("dtype")  # the answers' precision (bf16 and fp32 round differently)
    arrays = export_arrays.load(args.export, export)
    if export.get("arrays") and arrays is None:
        print(f"{export['arrays']} (the attention and image effect arrays) is not beside {args.export}: they are "
              f"computed again but not compared", file=sys.stderr)
    backend = make_backend(args, batch_slots=1)  # one conversation at a time
    backend.load()
    return 0 if all(replay(export, backend, arrays=arrays)) else 1

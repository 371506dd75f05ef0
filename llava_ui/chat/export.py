"""Export a conversation (settings, seed, model, inputs with their hashes, outputs) and re-run it.

`python -m llava_ui replay conversation.json` rebuilds each turn from the embedded inputs, regenerates every
answer with the recorded settings and seed, and says whether each answer came out the same.
"""
from __future__ import annotations

import base64
import io
import json
import sys
import time
from dataclasses import asdict

from PIL import Image

from llava_ui.config import GenerationSettings
from llava_ui.chat.conversation import Conversation, Picture
from llava_ui.errors import UserError
from llava_ui.chat.media import Frame, Video

FORMAT = "llava_ui.conversation/1"


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def export_conversation(conversation: Conversation, records: list[dict], settings: list[GenerationSettings],
                        model: str, image_mode: str | None) -> dict:
    """records[i] / settings[i]: the engine's final record and the settings of turn i's answer."""
    turns = []
    for turn, record, setting in zip(conversation.turns, records, settings):
        entry = {"text": turn.text, "answer": turn.answer,
                 "images": [{"name": p.name, "digest": p.digest, "png": _png(p.image)} for p in turn.pictures],
                 "settings": {**asdict(setting), "seed": (record or {}).get("seed", setting.seed),
                              "stop": list(setting.stop)}}
        if turn.video is not None:
            entry["video"] = {"name": turn.video.name, "digest": turn.video.digest, "fps": turn.video.fps,
                              "total_frames": turn.video.total_frames,
                              "frames": [{"index": f.index, "timestamp_s": f.timestamp_s, "digest": f.digest,
                                          "png": _png(f.image)} for f in turn.video.frames]}
        if record:
            entry["output"] = {k: record.get(k) for k in ("token_ids", "finish_reason", "image_mode",
                                                            "visual_tokens_per_image", "stats", "prompt")}
        turns.append(entry)
    return {"format": FORMAT, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": model,
            "image_mode": image_mode, "system": conversation.system, "turns": turns}


def import_turn(entry: dict) -> tuple[str, list[Picture], Video | None]:
    pictures = [Picture(_image(i["png"]), i.get("name", "")) for i in entry.get("images", [])]
    video = None
    if entry.get("video"):
        v = entry["video"]
        frames = [Frame(_image(f["png"]), f["index"], f.get("timestamp_s")) for f in v["frames"]]
        video = Video(frames=frames, total_frames=v.get("total_frames", len(frames)), fps=v.get("fps"),
                      name=v.get("name", ""), digest=v.get("digest", ""))
    return entry["text"], pictures, video


def replay(export: dict, backend, out=sys.stdout) -> list[bool]:
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
        match = final["text"] == entry.get("answer")
        same.append(match)
        out.write(f"turn {n}: {'same answer' if match else 'DIFFERENT answer'}\n{final['text']}\n\n")
        conversation.turns[-1].answer = entry.get("answer") if entry.get("answer") is not None else final["text"]
    return same


def add_replay_command(sub) -> None:
    from llava_ui.commands.main import add_model_arguments

    parser = sub.add_parser("replay", help="re-run an exported conversation and compare the answers")
    parser.add_argument("export", help="JSON file exported from the web UI's inspector")
    add_model_arguments(parser)
    parser.set_defaults(func=cmd_replay, model=None)


def cmd_replay(args) -> int:
    from llava_ui.commands.main import make_backend

    try:
        with open(args.export) as f:
            export = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {args.export}: {err}") from None
    args.model = args.model or export.get("model")
    args.image_mode = args.image_mode or export.get("image_mode")
    backend = make_backend(args)
    backend.load()
    return 0 if all(replay(export, backend)) else 1

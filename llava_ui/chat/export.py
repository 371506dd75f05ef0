"""Export a conversation (settings, seed, model, inputs with their hashes, outputs) and re-run it.

`python -m llava_ui replay conversation.json` rebuilds each turn from the embedded inputs, regenerates every
answer with the recorded settings and seed, and says whether each answer came out the same.
"""
from __future__ import annotations

import base64
import io
import time
from dataclasses import asdict

from PIL import Image

from llava_ui.chat.conversation import Conversation, Picture
from llava_ui.chat.media import Frame, Video
from llava_ui.config import GenerationSettings

FORMAT = "llava_ui.conversation/1"


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def export_conversation(conversation: Conversation, records: list[dict], settings: list[GenerationSettings],
                        model: str, image_mode: str | None, dtype: str | None = None) -> dict:
    """records[i] / settings[i]: the engine's final record and the settings of turn i's answer."""
    turns = []
    for turn, record, setting in zip(conversation.turns, records, settings):
        entry = {"text": turn.text, "answer": turn.answer,
                 "images": [{"name": p.name, "digest": p.digest, "png": _png(p.image)} for p in turn.pictures],
                 "settings": {**asdict(setting), "seed": record.seed if record else setting.seed,
                              "stop": list(setting.stop)}}
        if turn.video is not None:
            entry["video"] = {"name": turn.video.name, "digest": turn.video.digest, "fps": turn.video.fps,
                              "total_frames": turn.video.total_frames,
                              "frames": [{"index": f.index, "timestamp_s": f.timestamp_s, "digest": f.digest,
                                          "png": _png(f.image)} for f in turn.video.frames]}
        if record:  # a backend's Result
            output = record.to_dict()
            entry["output"] = {k: output[k] for k in ("token_ids", "finish_reason", "image_mode",
                                                      "visual_tokens_per_image", "stats", "prompt")}
            if record.logprobs is not None:  # the settings ask for them again on replay
                entry["output"]["logprobs"] = output["logprobs"]
        turns.append(entry)
    export = {"format": FORMAT, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": model,
              "image_mode": image_mode, "system": conversation.system, "turns": turns}
    if dtype:  # the precision the answers were computed in: a replay uses it too (bf16 and fp32 round differently)
        export["dtype"] = dtype
    return export


def import_turn(entry: dict) -> tuple[str, list[Picture], Video | None]:
    pictures = [Picture(_image(i["png"]), i.get("name", "")) for i in entry.get("images", [])]
    video = None
    if entry.get("video"):
        v = entry["video"]
        frames = [Frame(_image(f["png"]), f["index"], f.get("timestamp_s")) for f in v["frames"]]
        video = Video(frames=frames, total_frames=v.get("total_frames", len(frames)), fps=v.get("fps"),
                      name=v.get("name", ""), digest=v.get("digest", ""))
    return entry["text"], pictures, video

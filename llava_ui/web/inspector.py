"""What the research inspector and the status bar show: the exact prompt with each image's place, token and
speed numbers, the sampled video frames, the model's load state, and the conversation export."""
from __future__ import annotations

import html
import json
import math
import tempfile
import time
from pathlib import Path

from llava_ui.backends.base import Result
from llava_ui.chat import export_arrays
from llava_ui.chat.export import export_conversation
from llava_ui.chat.prompt import IMAGE_TOKEN
from llava_ui.web.session import ChatSession

EMPTY_INSPECTOR = ("*Send a message: the exact prompt, where each image went, token counts and speed of the last "
                   "answer appear here.*")


def stats_line(record: Result | None) -> str:
    """One line under the chat: how the last answer went."""
    if not record:
        return ""
    s = record.stats
    parts = [f"{s.generated_tokens} tokens", _finish(record.finish_reason)]
    if s.ttft_s is not None:
        parts.append(f"first token {s.ttft_s:.2f} s")
    if s.decode_tokens_per_s:
        parts.append(f"{s.decode_tokens_per_s:.1f} tokens/s")
    parts.append(f"prompt {s.prompt_tokens or 0:,} tokens ({s.visual_tokens or 0:,} visual)")
    return " · ".join(parts)


def _finish(reason: str) -> str:
    return {"stop": "finished", "length": "hit the token limit", "stopped": "stopped by you"}.get(reason, reason)


def media_labels(session: ChatSession, upto: int, dropped: int = 0) -> list[str]:
    """A label per image in prompt order for turns dropped..upto (inclusive), e.g. "turn 2 · image 1: a.png"."""
    labels = []
    for number, turn in enumerate(session.conversation.turns[dropped:upto + 1], dropped + 1):
        # by the image object, not its digest: two frames of a still scene share a digest
        names = {id(p.image): f"image {k}: {p.name or 'pasted'}" for k, p in enumerate(turn.pictures, 1)}
        if turn.video is not None:
            names.update({id(f.image): frame_caption(f) for f in turn.video.frames})
        labels += [f"turn {number} · {names.get(id(image), 'image')}" for image, _ in turn.media()]
    return labels


def frame_caption(frame) -> str:
    return f"frame {frame.index} @ {frame.timestamp_s:.2f} s" if frame.timestamp_s is not None else f"frame {frame.index}"


def inspector_views(session: ChatSession | None, context_length: int | None = None) -> tuple:
    """(summary markdown, highlighted prompt, raw prompt, frames gallery) for the last answered turn."""
    if session is None or not any(t.record for t in session.turns):
        return EMPTY_INSPECTOR, [], "", frames_gallery(session)
    index = max(i for i, t in enumerate(session.turns) if t.record)
    record = session.turns[index].record
    labels = media_labels(session, index, record.dropped_turns)
    tokens = record.visual_tokens_per_image
    rows = [f"| {i} | {label} | {n:,} |" for i, (label, n) in enumerate(zip(labels, tokens), 1)]
    return (summary(record, context_length, rows), highlighted_prompt(record.prompt, labels, tokens),
            record.prompt, frames_gallery(session))


def summary(record: Result, context_length: int | None, image_rows: list[str]) -> str:
    s = record.stats
    prompt_tokens = s.prompt_tokens or 0
    used = f"{prompt_tokens:,}" + (f" / {context_length:,} ({100 * prompt_tokens / context_length:.1f} %)"
                                   if context_length else "")
    ttft = f"{s.ttft_s:.3f} s" if s.ttft_s is not None else "–"
    speed = f"{s.decode_tokens_per_s:.1f} tokens/s" if s.decode_tokens_per_s else "–"
    lines = [
        f"**Last answer**: {_finish(record.finish_reason)} · seed `{record.seed}` · image mode `{record.image_mode}`",
        "", "| measure | value |", "|---|---|",
        f"| Context used | {used} tokens, {s.visual_tokens or 0:,} of them visual |",
        f"| Time to first token | {ttft} |",
        f"| Decoding | {speed}, {s.generated_tokens} tokens, {s.total_s or 0:.2f} s in all |",
        f"| Prefix cache | {s.cached_prefix_tokens or 0:,} prompt tokens reused |",
        f"| Images | {s.images_encoded} encoded, {s.images_from_cache} from the feature cache |",
    ]
    if s.precision:
        lines.append(f"| Precision | {s.precision} |")
    if s.weights:
        lines.append(f"| Weights | {s.weights} |")
    if s.decode_batch_max:
        lines.append(f"| Batching | each decode step shared with {s.decode_batch_mean - 1:.1f} other chats on "
                     f"average (at most {s.decode_batch_max - 1}) |")
    if record.image_mode == "trained" and any(t > 730 for t in record.visual_tokens_per_image):
        lines.append("| Anyres unpadding | LLaVA-NeXT's, as trained (the kept rows and columns rounded down) |")
    if record.dropped_turns:
        lines.append(f"| Dropped turns | the oldest {record.dropped_turns} left out to fit the context |")
    if image_rows:
        lines += ["", "**Visual tokens per image** (prompt order)", "", "| # | image | tokens |", "|---|---|---|"]
        lines += image_rows
    return "\n".join(lines)


def highlighted_prompt(prompt: str, labels: list[str], tokens: list[int]) -> list[tuple[str, str | None]]:
    """The prompt as HighlightedText: plain text, and each <image> tagged "#k name · N tok" (k = the row of the
    visual-tokens table) with the image that sits there."""
    pieces = prompt.split(IMAGE_TOKEN)
    spans = []
    for i, piece in enumerate(pieces):
        if i:
            short = labels[i - 1].split(" · ", 1)[-1] if i - 1 < len(labels) else "image"
            count = f" · {tokens[i - 1]} tok" if i - 1 < len(tokens) else ""
            spans.append((IMAGE_TOKEN, f"#{i} {short}{count}"))
        if piece:
            spans.append((piece, None))
    return spans


def frames_gallery(session: ChatSession | None) -> list:
    """The frames sampled from the most recent video, captioned "frame i @ t s"."""
    turns = session.conversation.turns if session else []
    video = next((t.video for t in reversed(turns) if t.video is not None), None)
    return [(f.image, frame_caption(f)) for f in video.frames] if video else []


def probabilities_html(record: Result | None) -> str:
    """The answer token by token, each shaded by how unsure the model was (1 - its probability); hovering a token
    shows its probability and the alternatives the model weighed. Empty when the answer has no probabilities."""
    if record is None or not record.logprobs:
        return ""
    spans = []
    for token in record.logprobs:
        chance = math.exp(token.logprob)
        lines = [f"{_shown(token.token)}: {100 * chance:.1f} %"]
        lines += [f"  {_shown(alt.token)}: {100 * math.exp(alt.logprob):.1f} %" for alt in token.top]
        spans.append(f'<span class="token" style="background: rgba(220, 38, 38, {0.75 * (1 - chance):.2f})" '
                     f'title="{html.escape(chr(10).join(lines))}">{html.escape(token.token)}</span>')
    return ('<div class="token-legend">Token probabilities: the redder, the less sure the model was; hover a '
            'token for its probability and the alternatives.</div>'
            f'<div class="token-probs">{"".join(spans)}</div>')


def _shown(token: str) -> str:
    return repr(token)  # quotes make spaces and newlines visible


def status_html(status: dict) -> str:
    state, model = status.get("state"), html.escape(str(status.get("model") or ""))
    if status.get("source"):
        model += f" <small>(from {html.escape(status['source'])})</small>"
    if state == "ready":
        details = " · ".join(html.escape(str(status[k])) for k in ("device", "precision" if status.get("precision")
                                                                    else "dtype") if status.get(k))
        if (status.get("options") or {}).get("weights"):
            details += f" · weights {html.escape(status['options']['weights'])}"
        if status.get("device_reason"):  # the same words as `llava-ui check` prints
            details += f" <small>({html.escape(status['device_reason'])})</small>"
        badge = (' <span class="badge-random" title="a test model: its answers are noise">random weights — '
                 'output is meaningless</span>' if status.get("random_weights") else "")
        return _status("ready", f"<b>Ready</b> · {model} · {details}{badge}")
    if state == "loading":
        message = html.escape(status.get("message") or "starting")
        return _status("loading", f"<b>Loading</b> {model}: {message}. You can browse the examples meanwhile; "
                                  f"messages are answered once it is ready.")
    if state == "failed":
        reason = html.escape(status.get("error") or status.get("message") or "unknown reason")
        return _status("failed", f"<b>The model failed to load</b>: {reason}. Check the model id or folder "
                                 f"(--model / LLAVA_MODEL), the network and the free disk space, then press "
                                 f"<b>Retry load</b>.")
    return _status("idle", f"<b>Model not loaded yet</b> · {model} · it loads with your first message (or press "
                           f"<b>Load now</b>).")


def _status(kind: str, text: str) -> str:
    return f'<div class="status {kind}"><span class="dot"></span><span>{text}</span></div>'


def write_export(session: ChatSession, model: str, folder: str, dtype: str | None = None) -> list[str]:
    """The conversation as `python -m llava_ui replay`-able JSON, and the inspector's arrays (attention, image
    effect) in an .npz beside it when an answer has them; returns the files' paths, the JSON first."""
    answered = [(turn, shown) for turn, shown in zip(session.conversation.turns, session.turns)
                if turn.answer is not None and shown.settings is not None]
    conversation = session.conversation.copy()
    conversation.turns = [turn for turn, _ in answered]
    records = [shown.record for _, shown in answered]
    image_mode = next((r.image_mode for r in reversed(records) if r), None)
    export = export_conversation(conversation, records, [shown.settings for _, shown in answered], model, image_mode,
                                 dtype)
    # a folder of its own: every tab shares `folder`, and two exports in the same second must not share a file
    name = f"llava-conversation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path = Path(tempfile.mkdtemp(prefix="export-", dir=folder)) / name
    arrays = {}
    for turn, (entry, record) in enumerate(zip(export["turns"], records)):
        found, keys = export_arrays.turn_arrays(turn, record)
        if keys:
            entry["output"]["arrays"] = keys
            arrays.update(found)
    if arrays:
        export["arrays"] = path.with_suffix(".npz").name
    path.write_text(json.dumps(export, ensure_ascii=False, indent=1))
    return [str(path)] + ([str(export_arrays.save(path.with_suffix(".npz"), arrays))] if arrays else [])

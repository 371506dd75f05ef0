"""How a chat session is drawn in Gradio's Chatbot: numbered image previews, a sheet of the sampled video frames,
the user's text with its markers numbered, and which turn a Chatbot message belongs to."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from llava_ui.backends.base import Progress
from llava_ui.backends.rates import human_seconds
from llava_ui.chat.conversation import VIDEO_TOKEN
from llava_ui.chat.media import Video
from llava_ui.chat.prompt import IMAGE_TOKEN
from llava_ui.errors import UserError

BADGE_COLOUR = (79, 70, 229)


def numbered_preview(image: Image.Image, number: int, digest: str, folder: str, size: int = 768) -> str:
    """A copy of the picture, at most `size` px, with a badge showing its number (the n of `<image n>`)."""
    path = Path(folder) / f"image-{digest}-{number}.png"
    if path.exists():
        return str(path)
    preview = image.copy()
    preview.thumbnail((size, size))
    draw = ImageDraw.Draw(preview)
    font = ImageFont.load_default(size=max(12, min(48, min(preview.size) // 7)))
    left, top, right, bottom = draw.textbbox((0, 0), str(number), font=font)
    pad = max(3, (bottom - top) // 3)
    corner = (4, 4, 4 + right - left + 2 * pad, 4 + bottom - top + 2 * pad)
    draw.rounded_rectangle(corner, radius=pad, fill=BADGE_COLOUR, outline="white", width=2)
    draw.text((4 + pad - left, 4 + pad - top), str(number), font=font, fill="white")
    preview.save(path)
    return str(path)


def contact_sheet(video: Video, folder: str, columns: int = 4, width: int = 640) -> str:
    """The sampled frames as one grid image: browsers cannot play every codec, but they can show this."""
    count = len(video.frames)
    columns = min(columns, count)
    rows = -(-count // columns)
    first = video.frames[0].image
    cell_w = width // columns
    cell_h = max(1, round(cell_w * first.height / max(first.width, 1)))
    sheet = Image.new("RGB", (cell_w * columns, cell_h * rows), "white")
    for i, frame in enumerate(video.frames):
        sheet.paste(frame.image.resize((cell_w - 2, cell_h - 2)), ((i % columns) * cell_w + 1, (i // columns) * cell_h + 1))
    path = Path(folder) / f"frames-{video.digest}-{count}.png"
    if not path.exists():
        sheet.save(path)
    return str(path)


def user_messages(text: str, shown) -> list[dict]:
    """The user's turn as Chatbot messages: the pictures in order (numbered when it helps), the video and a sheet of
    its sampled frames, then the text with its markers numbered (`<image 2>` is where picture 2 goes).

    Files and text are separate messages, and the Chatbot shows every piece in its own bubble: Gradio 6.17's edit
    box breaks on a bubble holding files, so only the text bubble is editable, and its edit reports just the text.
    """
    parts = [{"path": p, "alt_text": f"Image {i}: {Path(f).name}"}
             for i, (p, f) in enumerate(zip(shown.previews, shown.files), 1)]
    if len(shown.files) > len(shown.previews):
        parts.append({"path": shown.files[-1], "alt_text": f"video: {Path(shown.files[-1]).name}"})
    if shown.sheet:
        parts.append({"path": shown.sheet, "alt_text": "the video frames the model sees"})
    messages = [{"role": "user", "content": parts}] if parts else []
    if text.strip():
        messages.append({"role": "user", "content": shown_text(text)})
    return messages


def shown_text(text: str) -> str:
    """Markers as visible, numbered code spans (raw `<image>` would be swallowed as an HTML tag)."""
    count = iter(range(1, text.count(IMAGE_TOKEN) + 1))
    text = re.sub(re.escape(IMAGE_TOKEN), lambda _: f"`<image {next(count)}>`", text)
    return text.replace(VIDEO_TOKEN, f"`{VIDEO_TOKEN}`")


def typed_text(shown: str) -> str:
    """Undo `shown_text` (for an edited message coming back from the Chatbot)."""
    shown = re.sub(r"`?<image(?: \d+)?>`?", IMAGE_TOKEN, shown)
    return re.sub(r"`?<video>`?", VIDEO_TOKEN, shown)


def progress_text(event: Progress, unit: str = "image") -> str:
    """A progress event as the chat shows it in place of the answer: "encoding frame 5 of 16 · about 1 min left",
    "reading the prompt 40 % · 12 s left"."""
    done, total = event.done, event.total
    if event.stage == "queued":
        return f"*the server is busy: waiting for a free slot ({_ordinal(done)} in line)*"
    if event.stage == "vision":
        what = f"encoding {unit} {min(done + 1, total)} of {total}" if total > 1 else f"encoding the {unit}"
    else:
        what = f"reading the prompt {100 * done // max(total, 1)} %"
    eta = event.eta_s
    left = f" · {human_seconds(eta)} left" if eta is not None and eta >= 1 else ""
    return f"*{what}{left}*"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def chat_messages(session) -> list[dict]:
    """The Chatbot value: per turn the user's messages and the answer (partial while it is being written)."""
    return [message for _, message in _numbered_messages(session)]


def _numbered_messages(session) -> list[tuple[int, dict]]:
    """(turn index, Chatbot message) pairs."""
    if session is None:
        return []
    messages, turns = [], session.conversation.turns
    for i, (turn, shown) in enumerate(zip(turns, session.turns)):
        messages += [(i, message) for message in user_messages(turn.text, shown)]
        if turn.answer is not None:
            answer = turn.answer if turn.answer.strip() else "*(stopped before any text)*"
        elif i == len(turns) - 1 and session.busy:
            answer = session.partial or session.notice or "…"
        else:
            continue
        messages.append((i, {"role": "assistant", "content": answer}))
    return messages


def turn_index(session, message_index) -> int:
    """Which conversation turn a Chatbot message index (from a retry/undo/edit event) belongs to."""
    if isinstance(message_index, (tuple, list)):
        message_index = message_index[0]
    numbered = _numbered_messages(session)
    if not numbered:
        raise UserError("the chat is empty")
    return numbered[min(max(int(message_index), 0), len(numbered) - 1)][0]

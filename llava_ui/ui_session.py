"""One browser tab's chat: the conversation, what each turn showed, and how its answers were made.

Kept in a `gr.State`, so every handler gets the same object. The Chatbot's value is always drawn from here
(`chat_messages`), never read back, so the model's conversation and the screen cannot drift apart.
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .config import GenerationSettings
from .conversation import VIDEO_TOKEN, Conversation, Picture
from .errors import UserError
from .media import Video, load_image, load_video
from .prompt import IMAGE_TOKEN

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv")


@dataclass
class TurnRecord:
    """What the UI keeps beside a conversation turn: the files as uploaded and how its answer was made."""

    files: list[str]
    sheet: str | None = None  # contact sheet of the sampled video frames, shown in the chat
    record: dict | None = None  # the engine's final "done" event
    settings: GenerationSettings | None = None


@dataclass
class ChatSession:
    conversation: Conversation = field(default_factory=Conversation)
    turns: list[TurnRecord] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    idle: threading.Event = field(default_factory=threading.Event)  # set when no answer is being generated
    partial: str = ""  # the answer so far while one is being written
    notice: str = ""  # shown in place of the answer before the first token (e.g. "the model is loading")

    def __post_init__(self):
        self.idle.set()

    @property
    def busy(self) -> bool:
        return not self.idle.is_set()

    def last_record(self) -> dict | None:
        return next((t.record for t in reversed(self.turns) if t.record), None)

    def truncate(self, count: int) -> None:
        """Keep the first `count` turn records (after the conversation dropped later turns)."""
        del self.turns[count:]


def check_files(paths: list[str], max_files: int, max_upload_mb: float) -> tuple[list[str], str | None]:
    """Split uploads into images and at most one video; refuse what the limits or file types do not allow."""
    if len(paths) > max_files:
        raise UserError(f"you attached {len(paths)} files; the limit is {max_files} per message")
    images, videos = [], []
    for path in paths:
        name, suffix = Path(path).name, Path(path).suffix.lower()
        size_mb = os.path.getsize(path) / 2**20 if os.path.exists(path) else 0
        if size_mb > max_upload_mb:
            raise UserError(f"{name} is {size_mb:.1f} MB; the limit is {max_upload_mb:g} MB per file")
        if suffix in IMAGE_EXTENSIONS:
            images.append(path)
        elif suffix in VIDEO_EXTENSIONS:
            videos.append(path)
        else:
            raise UserError(f"{name}: {suffix or 'this file type'} is not supported; attach images "
                            f"(png, jpg, webp, gif, bmp, tiff) or a video (mp4, webm, avi, mov, mkv)")
    if len(videos) > 1:
        raise UserError(f"you attached {len(videos)} videos; attach at most one video per message")
    return images, videos[0] if videos else None


def add_message(session: ChatSession, text: str, paths: list[str], frames: int, max_files: int,
                max_upload_mb: float, sheet_dir: str | None = None) -> None:
    """Decode the uploads and append the user's turn, or raise UserError leaving the session as it was."""
    if session.busy:
        raise UserError("an answer is still being written: wait for it or press Stop")
    settle(session)
    images, video_path = check_files(paths, max_files, max_upload_mb)
    pictures = [load_image(p, name=Path(p).name) for p in images]
    video = load_video(video_path, int(frames), name=Path(video_path).name) if video_path else None
    session.conversation.add_user(text, [Picture(img, Path(p).name) for img, p in zip(pictures, images)], video)
    shown = images + ([video_path] if video_path else [])
    session.turns.append(TurnRecord(shown, contact_sheet(video, sheet_dir) if video else None))


def settle(session: ChatSession) -> None:
    """A generation that ended without its final record (cancelled mid-step) keeps its partial answer."""
    turns = session.conversation.turns
    if session.busy or not turns:
        return
    if turns[-1].answer is None and session.turns[-1].record is not None:
        turns[-1].answer = session.turns[-1].record.get("text", "")
    elif turns[-1].answer is None:
        turns[-1].answer = session.partial  # stopped before (or while) generating


def contact_sheet(video: Video, folder: str | None = None, columns: int = 4, width: int = 640) -> str:
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
    folder = folder or tempfile.mkdtemp(prefix="llava_ui_frames_")
    path = Path(folder) / f"frames-{video.digest}-{count}.png"
    if not path.exists():
        sheet.save(path)
    return str(path)


def user_content(text: str, files: list[str], sheet: str | None, has_video: bool) -> list:
    """The user's turn as Chatbot content: the text with numbered markers (`<image 2>` is the 2nd image), then the
    images in that order, then the video and its sampled frames.

    The text stays one piece: the Chatbot's edit event reports only a message's first text piece.
    """
    images = files[:-1] if has_video else files
    parts = [{"path": p, "alt_text": f"Image {i}: {Path(p).name}"} for i, p in enumerate(images, 1)]
    if has_video:
        parts.append({"path": files[-1], "alt_text": f"video: {Path(files[-1]).name}"})
    if sheet:
        parts.append({"path": sheet, "alt_text": "the video frames the model sees"})
    return ([shown_text(text)] if text.strip() else []) + parts


def shown_text(text: str) -> str:
    """Markers as visible, numbered code spans (raw `<image>` would be swallowed as an HTML tag)."""
    count = iter(range(1, text.count(IMAGE_TOKEN) + 1))
    text = re.sub(re.escape(IMAGE_TOKEN), lambda _: f"`<image {next(count)}>`", text)
    return text.replace(VIDEO_TOKEN, f"`{VIDEO_TOKEN}`")


def typed_text(shown: str) -> str:
    """Undo `shown_text` (for an edited message coming back from the Chatbot)."""
    shown = re.sub(r"`?<image(?: \d+)?>`?", IMAGE_TOKEN, shown)
    return re.sub(r"`?<video>`?", VIDEO_TOKEN, shown)


def chat_messages(session: ChatSession | None) -> list[dict]:
    """The Chatbot value: per turn the user's message and the answer (partial while it is being written)."""
    if session is None:
        return []
    messages, turns = [], session.conversation.turns
    for i, (turn, shown) in enumerate(zip(turns, session.turns)):
        messages.append({"role": "user", "content": user_content(turn.text, shown.files, shown.sheet,
                                                                   turn.video is not None)})
        if turn.answer is not None:
            answer = turn.answer if turn.answer.strip() else "*(stopped before any text)*"
        elif i == len(turns) - 1 and session.busy:
            answer = session.partial or session.notice or "…"
        else:
            continue
        messages.append({"role": "assistant", "content": answer})
    return messages


def turn_index(session: ChatSession, message_index: int) -> int:
    """Which conversation turn a Chatbot message index (from a retry/undo/edit event) belongs to."""
    if isinstance(message_index, (tuple, list)):
        message_index = message_index[0]
    roles = [m["role"] for m in chat_messages(session)]
    return max(0, sum(1 for role in roles[:message_index + 1] if role == "user") - 1)

"""One browser tab's chat: the conversation, what each turn showed, and how its answers were made.

Kept in a `gr.State`, so every handler gets the same object. The Chatbot's value is always drawn from here
(`ui_render.chat_messages`), never read back, so the model's conversation and the screen cannot drift apart.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from llava_ui.backends.base import Result
from llava_ui.chat.conversation import Conversation
from llava_ui.chat.prompt import IMAGE_TOKEN
from llava_ui.config import GenerationSettings
from llava_ui.errors import UserError
from llava_ui.web.render import contact_sheet, numbered_preview

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv")


@dataclass
class TurnRecord:
    """What the UI keeps beside a conversation turn: the files as uploaded, what the chat shows for them, and how
    its answer was made."""

    files: list[str]  # uploaded paths: the images in order, then the video
    previews: list[str] = field(default_factory=list)  # per image, the picture shown (numbered when it helps)
    sheet: str | None = None  # contact sheet of the sampled video frames
    record: Result | None = None  # how the backend's answer ended
    settings: GenerationSettings | None = None


@dataclass
class ChatSession:
    conversation: Conversation = field(default_factory=Conversation)
    stop: threading.Event = field(default_factory=threading.Event)
    idle: threading.Event = field(default_factory=threading.Event)  # set when no answer is being generated
    partial: str = ""  # the answer so far while one is being written
    notice: str = ""  # shown in place of the answer before the first token (e.g. "the model is loading")
    cleared: bool = False  # replaced by a fresh session (Clear): a late answer must not come back

    def __post_init__(self):
        self.idle.set()

    @property
    def busy(self) -> bool:
        return not self.idle.is_set()

    @property
    def turns(self) -> list[TurnRecord]:
        """What each conversation turn showed: kept on the turn itself, so undo and edit drop both at once."""
        return [turn.shown for turn in self.conversation.turns]

    def last_record(self) -> Result | None:
        return next((t.record for t in reversed(self.turns) if t.record), None)


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
                max_upload_mb: float, folder: str) -> None:
    """Decode the uploads and append the user's turn, or raise UserError leaving the session as it was."""
    if session.busy:
        raise UserError("an answer is still being written: wait for it or press Stop")
    settle(session)
    images, video_path = check_files(paths, max_files, max_upload_mb)
    turn = session.conversation.add_user_files(text, images, video_path, frames)
    video = turn.video
    numbered = len(images) > 1 or IMAGE_TOKEN in text  # a badge "2" on the picture that `<image 2>` names
    previews = [numbered_preview(p.image, i, p.digest, folder) if numbered else path
                for i, (p, path) in enumerate(zip(turn.pictures, images), 1)]
    turn.shown = TurnRecord(images + ([video_path] if video_path else []), previews,
                            contact_sheet(video, folder) if video else None)


def settle(session: ChatSession) -> None:
    """A generation that ended without its final record (cancelled mid-step) keeps its partial answer."""
    turns = session.conversation.turns
    if session.busy or not turns:
        return
    if turns[-1].answer is None and session.turns[-1].record is not None:
        turns[-1].answer = session.turns[-1].record.text
    elif turns[-1].answer is None:
        turns[-1].answer = session.partial  # stopped before (or while) generating

"""A chat held as turns of text, images and video, rendered to ChatML on demand, and editable."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from llava_ui.chat.media import Video, image_digest, load_image, load_video
from llava_ui.chat.prompt import IMAGE_TOKEN, Message, clean_user_text, place_images
from llava_ui.errors import UserError

VIDEO_TOKEN = "<video>"
MAX_MESSAGE_CHARS = 20_000  # ~5k tokens; longer pastes would take minutes to prefill on a CPU


@dataclass
class Picture:
    image: Image.Image
    name: str = ""
    digest: str = ""

    def __post_init__(self):
        self.digest = self.digest or image_digest(self.image)


@dataclass
class Turn:
    text: str
    pictures: list[Picture] = field(default_factory=list)
    video: Video | None = None
    answer: str | None = None
    shown: object = None  # what a front end keeps with this turn (the web chat: its files, previews, result)

    def media(self) -> list[tuple[Image.Image, str]]:
        """(image, digest) pairs in prompt order: pictures and video frames, placed as `content` places them."""
        frames = [(f.image, f.digest) for f in self.video.frames] if self.video else []
        pictures = [(p.image, p.digest) for p in self.pictures]
        if self.video is not None and VIDEO_TOKEN in self.text:
            split = self.text.split(VIDEO_TOKEN)[0].count(IMAGE_TOKEN)
            return pictures[:split] + frames + pictures[split:]
        return frames + pictures

    def content(self) -> str:
        """User content with one <image> per image. A `<video>` marker stands for all the video's frames; without
        one the frames lead, as in the reference demo. Pictures follow the <image> markers, or lead when none."""
        frames = len(self.video.frames) if self.video else 0
        text = self.text
        if self.video is None and VIDEO_TOKEN in text:
            raise UserError(f"the message has a {VIDEO_TOKEN} marker but no video is attached")
        if text.count(VIDEO_TOKEN) > 1:
            raise UserError(f"use at most one {VIDEO_TOKEN} marker per message")
        if self.video is not None and VIDEO_TOKEN in text:
            before, after = text.split(VIDEO_TOKEN)
            counted = before.count(IMAGE_TOKEN) + after.count(IMAGE_TOKEN)
            if counted and counted != len(self.pictures):
                place_images(before + after, len(self.pictures))  # raises the count-mismatch message
            if not counted and self.pictures:
                before = IMAGE_TOKEN * len(self.pictures) + "\n" + before
            return before + IMAGE_TOKEN * frames + after
        body = place_images(text, len(self.pictures))
        return IMAGE_TOKEN * frames + "\n" + body if frames else body


@dataclass
class Conversation:
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def add_user(self, text: str, pictures=(), video: Video | None = None) -> Turn:
        if self.turns and self.turns[-1].answer is None:
            raise UserError("the last message has no answer yet")
        text = clean_user_text(text or "")
        if len(text) > MAX_MESSAGE_CHARS:
            raise UserError(f"the message is {len(text):,} characters long; the limit is {MAX_MESSAGE_CHARS:,}")
        pictures = [p if isinstance(p, Picture) else Picture(p) for p in pictures]
        if not text.strip() and not pictures and video is None:
            raise UserError("the message is empty: type some text or attach an image or a video")
        turn = Turn(text=text, pictures=pictures, video=video)
        turn.content()  # validates the markers now, before the turn joins the conversation
        self.turns.append(turn)
        return turn

    def add_user_files(self, text: str, image_paths=(), video_path=None, frames: int = 16) -> Turn:
        """add_user with the images and the video read from files (a UserError names a file that cannot be)."""
        pictures = [Picture(load_image(path, name=Path(path).name), Path(path).name) for path in image_paths]
        video = load_video(video_path, int(frames), name=Path(video_path).name) if video_path else None
        return self.add_user(text, pictures, video)

    def messages(self, turns=None) -> list[Message]:
        out = []
        for turn in self.turns if turns is None else turns:
            out.append(Message("user", turn.content()))
            if turn.answer is not None:
                out.append(Message("assistant", turn.answer))
        return out

    def media(self, turns=None) -> list[tuple[Image.Image, str]]:
        return [m for turn in (self.turns if turns is None else turns) for m in turn.media()]

    def pending(self) -> Turn:
        if not self.turns or self.turns[-1].answer is not None:
            raise UserError("there is no message waiting for an answer")
        return self.turns[-1]

    def undo(self) -> Turn | None:
        """Remove the last turn (question and answer); returns it so a UI can put the text back in the box."""
        return self.turns.pop() if self.turns else None

    def edit(self, index: int, text: str) -> Turn:
        """Replace a past user message and drop everything after it; the edited turn then awaits an answer."""
        if not 0 <= index < len(self.turns):
            raise UserError(f"there is no message {index}")
        turn = copy.copy(self.turns[index])
        turn.text, turn.answer = clean_user_text(text), None
        turn.content()
        self.turns = self.turns[:index] + [turn]
        return turn

    def copy(self) -> "Conversation":
        return Conversation(self.system, [copy.copy(t) for t in self.turns])

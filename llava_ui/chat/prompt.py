"""The ChatML prompt of conversation mode `qwen_1_5`, every marker (`<image>` in text, IMAGE_MARKER in ids,
the special tokens), and tokenization into prompt ids (LLaVA-NeXT's `conversation.py` and `mm_utils.py`).

The prompt is built as segments (special tokens, text, images) and only then tokenized, text piece by text
piece: paddlenlp's Qwen2Tokenizer strips the newline after `<|im_end|>` when it sees the whole string, and user
text must never turn into special tokens (typing `<|im_end|>` cannot end a turn).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from llava_ui.config import DEFAULT_SYSTEM_PROMPT
from llava_ui.errors import UserError

IMAGE_TOKEN = "<image>"
IMAGE_MARKER = -200  # stands for one image in prompt ids, as in the reference's tokenizer_image_token
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


@dataclass
class Message:
    role: str  # "user" | "assistant"
    content: str  # user content carries one <image> per image, where the image goes


def place_images(text: str, count: int) -> str:
    """Markers already in the text: the images go exactly there. None: all of them first, then a newline."""
    found = text.count(IMAGE_TOKEN)
    if found == 0:
        return IMAGE_TOKEN * count + "\n" + text if count else text
    if found != count:
        raise UserError(f"the message has {found} {IMAGE_TOKEN} marker{'s' * (found != 1)} but {count} "
                        f"image{'s' * (count != 1)} (video frames count as images)")
    return text


def segments(system: str | None, messages: list[Message], generation_prompt: bool = True):
    """Yield ("special", token) / ("text", str) / ("image", None) pieces of the ChatML prompt, in order."""
    turns = [Message("system", DEFAULT_SYSTEM_PROMPT if system is None else system)] + list(messages)
    for message in turns:
        yield "special", IM_START
        yield "text", message.role + "\n"
        if message.role == "user":
            pieces = message.content.split(IMAGE_TOKEN)
            for i, piece in enumerate(pieces):
                if i:
                    yield "image", None
                if piece:
                    yield "text", piece
        elif message.content:
            yield "text", message.content
        yield "special", IM_END
        yield "text", "\n"
    if generation_prompt:
        yield "special", IM_START
        yield "text", "assistant\n"


def render_prompt(system, messages, generation_prompt: bool = True) -> str:
    return "".join(IMAGE_TOKEN if kind == "image" else piece for kind, piece in segments(system, messages, generation_prompt))


class PromptTokenizer:
    """Wraps a paddlenlp Qwen2 tokenizer: text pieces encoded separately, specials by id, images as IMAGE_MARKER."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IM_START, IM_END, ENDOFTEXT)}
        self.stop_ids = {self.special_ids[IM_END], self.special_ids[ENDOFTEXT]}
        self.all_special_ids = set(tokenizer.all_special_ids) | set(self.special_ids.values())
        self.size = len(tokenizer)  # ids past it are padding rows of the embedding, not tokens
        self._cache: dict[str, list[int]] = {}
        self._bytes: dict[int, bytes] = {}

    def encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
            if len(text) < 256:  # role headers and separators repeat on every turn
                self._cache[text] = ids
        return list(ids)

    def encode_prompt(self, system, messages, generation_prompt: bool = True) -> list[int]:
        ids = []
        for kind, piece in segments(system, messages, generation_prompt):
            if kind == "special":
                ids.append(self.special_ids[piece])
            elif kind == "image":
                ids.append(IMAGE_MARKER)
            else:
                ids.extend(self.encode_text(piece))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes: a byte-level BPE piece can hold part of a character. Special tokens are their
        text; ids past the vocabulary (padding rows) have none."""
        found = self._bytes.get(token_id)
        if found is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < self.size else ""
            # printable ASCII stands for itself in the byte alphabet, so special tokens come out as their text
            found = (bytes(BYTE_OF_CHAR[c] for c in piece) if all(c in BYTE_OF_CHAR for c in piece)
                     else piece.encode())
            self._bytes[token_id] = found
        return found

    def decode(self, ids) -> str:
        ids = [i for i in ids if i not in self.all_special_ids and 0 <= i < self.size]
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (Qwen's too): each byte as a printable character, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_OF_CHAR = _byte_alphabet()


def clean_user_text(text: str) -> str:
    """Drop control characters a user may paste (keeping newlines and tabs)."""
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text)

"""The inspector's "where the model looked" and "what the images changed" views of an answer: which token and
band of layers to look at, a heat map per image (heatmap.py) captioned with the image's share of the attention,
the shares as a bar list, and the answer shaded by how much each token owed to the images."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from llava_ui.backends.base import Result
from llava_ui.chat.export_arrays import attention_by_image
from llava_ui.model.processing import prepare_images
from llava_ui.web.heatmap import CLIP_PERCENTILE, base_view, image_maps, tiles_view
from llava_ui.web.inspector import media_labels

WHOLE = "all"  # the token choice that averages over the whole answer
MAPS = (f"Each map is normalised on its own: the brightest patches are its top {100 - CLIP_PERCENTILE:g} % "
        "(a percentile clip), whatever the image's share.")
NOTE = ("Attention shows where each answer token's query read from (averaged over heads), not why the model "
        "answered so: it is not an explanation, and a few \"sink\" positions take much of the weight whatever they "
        "show.")


def selected(arrays: list[np.ndarray], token: str, first_layer: int, last_layer: int) -> list[np.ndarray]:
    """`arrays`: attention_by_image's. Per image, its weights averaged over the chosen token (an index, or WHOLE)
    and layers first..last (1-based, inclusive, either order)."""
    rows = slice(None) if token in (WHOLE, None, "") else slice(int(token), int(token) + 1)
    lo, hi = sorted((int(first_layer), int(last_layer)))
    return [a[rows, lo - 1:hi].mean(axis=(0, 1)) for a in arrays]


def token_texts(record: Result, token_bytes=None) -> list[str]:
    """Each generated token's text: from the token probabilities when kept, else from the tokenizer's bytes."""
    if record.logprobs is not None and len(record.logprobs) == len(record.token_ids):
        return [t.token for t in record.logprobs]
    if token_bytes is None:
        return [f"#{t}" for t in record.token_ids]
    return [token_bytes(t).decode("utf-8", errors="replace") for t in record.token_ids]


def token_choices(texts: list[str]) -> list[tuple[str, str]]:
    return [("the whole answer", WHOLE)] + [(f"{i + 1}: {text!r}", str(i)) for i, text in enumerate(texts)]


@dataclass
class AnsweredImages:
    """The images of the prompt an answer was computed from, in prompt order, with how each was prepared."""

    pictures: list[Image.Image]
    prepared: list  # processing.PreparedImage
    labels: list[str]


def answered_images(session, index: int, record: Result, config) -> AnsweredImages:
    """The images turn `index`'s answer saw (the turns it kept), planned again as the engine planned them."""
    kept = session.conversation.turns[record.dropped_turns:index + 1]
    media = session.conversation.media(kept)
    prepared = prepare_images([m[0] for m in media], record.image_mode, config, [m[1] for m in media],
                              has_video=any(turn.video is not None for turn in kept))
    return AnsweredImages([m[0] for m in media], prepared, media_labels(session, index, record.dropped_turns))


@dataclass
class LookedAt:
    heatmaps: list[tuple[Image.Image, str]]  # (picture, caption) for a gallery
    shares: list[float]  # per image: its share of all attention
    text_share: float  # the rest: the text's positions (system prompt, question, the answer so far)


def look(weights: list[np.ndarray], images: AnsweredImages, side: int = 27) -> LookedAt:
    """The heat maps and shares of the selected weights (one array per image)."""
    heatmaps, shares = [], []
    for values, picture, prepared, label in zip(weights, images.pictures, images.prepared, images.labels):
        maps = image_maps(values, prepared, side)
        shares.append(maps.share)
        short = label.split(" · ", 1)[-1]
        heatmaps.append((base_view(picture, maps, prepared.view), f"{short} · {100 * maps.share:.1f} % of the "
                                                                  f"attention"))
        if maps.tiles is not None:
            cols, rows = prepared.grid
            heatmaps.append((tiles_view(picture, maps, prepared),
                             f"{short} · anyres tiles {cols}×{rows}, the unpadded crop in cyan"))
    return LookedAt(heatmaps, shares, 1.0 - sum(shares))


def shares_html(looked: LookedAt, labels: list[str]) -> str:
    """Each image's share as a bar (bars relative to the largest image share, numbers absolute), the text's
    share, and what attention is not."""
    top = max(looked.shares, default=0) or 1.0
    rows = [f'<div class="share-row"><span class="share-label">{html.escape(label)}</span>'
            f'<span class="share-bar"><span style="width: {100 * share / top:.1f}%"></span></span>'
            f'<span class="share-value">{100 * share:.1f} %</span></div>'
            for label, share in zip(labels, looked.shares)]
    text = (f'<div class="share-text">The text (system prompt, question, the answer so far): '
            f'<span class="share-value">{100 * looked.text_share:.1f} %</span></div>')
    return (f'<div class="attention-shares"><div class="share-title">Share of all attention per image</div>'
            f'{"".join(rows)}{text}<div class="attention-note">{html.escape(MAPS)} {html.escape(NOTE)}</div></div>')


def effect_html(effect: list[float] | None, texts: list[str]) -> str:
    """The answer token by token, shaded by how much the images changed its log-probability: green where the
    images made it likelier, purple where they made it less likely; hover for the number."""
    if not effect:
        return ""
    spans = []
    for value, text in zip(effect, texts):
        strength = 0.8 * min(1.0, abs(value) / 4)
        colour = "22, 163, 74" if value >= 0 else "147, 51, 234"
        title = (f"{text!r}: log p with the images − without = {value:+.2f} "
                 f"({math.exp(max(min(value, 50), -50)):.3g}× as likely with them)")
        spans.append(f'<span class="token" style="background: rgba({colour}, {strength:.2f})" '
                     f'title="{html.escape(title)}">{html.escape(text)}</span>')
    return ('<div class="token-legend">What the images changed: the greener, the more the images made a token '
            'likelier (purple: less likely); hover for the change of its log-probability.</div>'
            f'<div class="token-probs image-effect">{"".join(spans)}</div>')


class AttentionDrawings:
    """A session's last answer drawn for a choice of token and layers; keeps that answer's attention as arrays, so
    a new choice only averages and draws."""

    def __init__(self):
        self._arrays: tuple = (None, [])  # (the Result, attention_by_image of it)

    def draw(self, session, config, token: str, first_layer: int, last_layer: int):
        """(LookedAt, the images' labels), or None when the last answer has no attention over images."""
        answered = [i for i, t in enumerate(session.turns) if t.record] if session else []
        record = session.turns[answered[-1]].record if answered else None
        if config is None or record is None or not record.attention:
            return None
        arrays = self._arrays
        if arrays[0] is not record:
            arrays = self._arrays = (record, attention_by_image(record.attention))
        images = answered_images(session, answered[-1], record, config)
        looked = look(selected(arrays[1], token, first_layer, last_layer), images, config.vision.patches_per_side)
        return looked, images.labels

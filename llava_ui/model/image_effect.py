"""What the images changed: for each generated token, its log-probability with the images minus without them.

The log-probabilities with the images are the ones decoding computed anyway (logprobs.step_scores). Those without
are read after the answer, off the fast path: the same prompt with every image placeholder taken out (the text
exactly as it was) and the answer teacher-forced after it, in one prefill of text positions only. A token whose
log-probability rose a lot was chosen because of what the model saw.
"""
from __future__ import annotations

import paddle

from llava_ui.chat.prompt import IMAGE_MARKER
from llava_ui.model.logprobs import step_scores

ROWS = 64  # answer positions per LM-head product: bounds the [rows, vocabulary] logits held at once


def without_images(prompt_ids: list[int]) -> list[int]:
    """The prompt's ids with the image placeholders (and so every visual position) removed."""
    return [t for t in prompt_ids if t != IMAGE_MARKER]


def logprobs_without_images(model, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    """Each of `token_ids`' raw log-probabilities when the answer follows the prompt without its images."""
    if not token_ids:
        return []
    ids = without_images(prompt_ids) + token_ids[:-1]
    first = len(ids) - len(token_ids)  # the position that produced the first generated token
    embeds = model.embed_prompt(ids, [])
    length, chunk = embeds.shape[1], model.prefill_chunk(embeds)
    cache, kept = model.reserve(None, length), []
    for lo in range(0, length, chunk):
        hidden, cache = model.forward_hidden(embeds[:, lo:lo + chunk], cache, lo)
        if lo + chunk > first:
            kept.append(hidden[0, max(first - lo, 0):])
    del cache
    rows = kept[0] if len(kept) == 1 else paddle.concat(kept)
    found = []
    for lo in range(0, len(token_ids), ROWS):
        logits = model.logits(rows[lo:lo + ROWS]).numpy()
        found += [step_scores(row, token, 0).logprob for row, token in zip(logits, token_ids[lo:lo + ROWS])]
    return found


def image_effect(with_images: list[float], without: list[float]) -> list[float]:
    """Per token: log p(token | images, text) - log p(token | text)."""
    return [a - b for a, b in zip(with_images, without)]

"""The engine's steps, as plain functions (gpt-fast style): a prompt's prefill chunk by chunk, one chat's decode
step, the decode loop that samples each next token, and incremental detokenization. The vision view step is the
model's (LlavaQwen.encode_views); the scheduler (scheduler.py) runs every step on the thread that owns the model."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from llava_ui.config import GenerationSettings
from llava_ui.errors import Stopped
from llava_ui.model.cpu import release_free_memory
from llava_ui.model.logprobs import step_scores
from llava_ui.model.kv_cache import HEADROOM
from llava_ui.model.sampling import sample_next


def _call(fn, *args):
    return fn(*args)


@dataclass
class Prefilled:
    """What a prefill leaves: the last position's logits (None when stopped before the end), the KV cache and the
    positions it holds."""

    logits: Any = None
    cache: Any = None
    positions: int = 0


@dataclass
class Chunk:
    """One prefill chunk done: `done` of the `total` new positions, this chunk's first position and length, and the
    seconds it took."""

    done: int
    total: int
    start: int
    length: int
    seconds: float


@dataclass
class Decoding:
    """What a decode loop leaves: the KV cache, how many yielded tokens it holds (`fed`) and why it ended
    (`finish`: stop | length | stopped)."""

    cache: Any = None
    fed: int = 0
    finish: str = "stopped"


def prefill_chunks(model, embeds, cache=None, start: int = 0, *, room: int = 0, run=_call,
                   should_stop: Callable[[], bool] = lambda: False, result: Prefilled | None = None) -> Iterator[Chunk]:
    """Run the prompt (or the new part after a cached prefix) one prefill chunk at a time, yielding a Chunk after
    each; `result` gets
    the logits of the last position and the cache. The cache gets room for the prompt + `room` positions.

    Each chunk is one model step through `run` (the engine's compute thread): other requests' steps run between
    them, and when `should_stop()` turns true the prefill ends between two layers of the current chunk
    (`result.logits` stays None)."""
    result = Prefilled() if result is None else result
    result.logits = None
    length = embeds.shape[1]
    chunk = model.prefill_chunk(embeds)
    # room for the whole prompt up front: chunks never regrow the cache
    cache = result.cache = run(model.reserve, cache, start + length + room)
    hidden = None

    def step(lo):
        # each chunk's short-lived blocks land on other freed pages of the heap: handed back before every
        # chunk, a long prompt's resident size stays that of one chunk
        began = time.perf_counter()
        release_free_memory()
        try:
            out = model.forward_hidden(embeds[:, lo:lo + chunk], result.cache, start + lo, should_stop)
        except Stopped:
            return None, 0.0
        return out, time.perf_counter() - began

    for lo in range(0, length, chunk):
        if lo and should_stop():
            return
        out, seconds = run(step, lo)
        if out is None:  # stopped between two layers of this chunk
            return
        hidden, result.cache = out
        done = min(lo + chunk, length)
        result.positions = start + done
        yield Chunk(done, length, start + lo, done - lo, seconds)

    def last():
        logits = model.logits(hidden[:, -1])[0]
        release_free_memory()
        return logits

    result.logits = run(last)


def prefill(model, embeds, cache=None, start: int = 0, *, room: int = 0, run=_call,
            should_stop: Callable[[], bool] = lambda: False):
    """The whole prefill at once: (logits of the last position, cache), or (None, the partly filled cache) when
    stopped between two chunks."""
    result = Prefilled()
    for _ in prefill_chunks(model, embeds, cache, start, room=room, run=run, should_stop=should_stop, result=result):
        pass
    return result.logits, result.cache


def decode_one_token(model, token: int, cache, position: int):
    """(logits [vocab], cache) of one chat's decode step: a batched step of one (LlavaQwen.decode_batch)."""
    logits, caches = model.decode_batch([token], [cache], [position])
    return logits[0], caches[0]


def generate_ids(model, embeds, settings: GenerationSettings, stop_ids: set[int], *, cache=None, start: int = 0,
                 seen: list[int] | None = None, should_stop: Callable[[], bool] = lambda: False,
                 run=_call, state: Decoding | None = None, decode_step=None) -> Iterator[int]:
    """Prefill, then yield generated token ids (see decode_tokens); `state` and `decode_step` as there."""
    if should_stop():
        return
    result = Prefilled()
    for _ in prefill_chunks(model, embeds, cache, start, room=decode_room(settings), run=run, should_stop=should_stop,
                            result=result):
        pass
    if result.logits is not None:  # else stopped between two chunks of a long prompt
        yield from decode_tokens(model, result.logits, result.cache, start + embeds.shape[1], settings,
                                 stop_ids, seen=seen, should_stop=should_stop, run=run, state=state,
                                 decode_step=decode_step)


def decode_room(settings: GenerationSettings) -> int:
    """Decode room a prefill reserves up front: a short answer's whole length; a long one grows the cache HEADROOM
    positions at a time."""
    return min(settings.max_new_tokens, HEADROOM)


def decode_tokens(model, logits, cache, position: int, settings: GenerationSettings, stop_ids: set[int], *,
                  seen: list[int] | None = None, should_stop: Callable[[], bool] = lambda: False, run=_call,
                  state: Decoding | None = None, decode_step=None, scores: list | None = None) -> Iterator[int]:
    """From the prompt's last logits, yield generated token ids; ends at a stop id (not yielded), at
    max_new_tokens, or when should_stop() is true.

    `should_stop` is checked before every model step, so a stop request costs at most one decode step. Each step
    runs through `run` (the engine's compute thread; by default here) and nothing is computed between yields.
    `state` (a Decoding) receives the KV cache, how many yielded tokens it holds and why generation ended. `decode_step(model, token, cache, position)` → (logits, cache) is the decode step (the
    engine's batches the steps of concurrent chats; by default decode_one_token through `run`).
    With settings.logprobs set, `scores` gets each yielded token's StepScores (logprobs.py) before it is yielded.
    """
    if decode_step is None:
        def decode_step(model, token, cache, position):
            return run(decode_one_token, model, token, cache, position)

    state = Decoding() if state is None else state
    seen = list(seen or [])
    rng = np.random.default_rng(settings.seed)
    state.finish, state.fed, state.cache = "stopped", 0, cache
    for step in range(settings.max_new_tokens):
        # sampled in the caller's thread: the compute thread meanwhile runs the other chats' steps (a batched
        # decode step waits for every decoding chat's next token)
        token = sample_next(logits, settings, seen, rng)
        if token in stop_ids:
            state.finish = "stop"
            return
        seen.append(token)
        if settings.logprobs is not None and scores is not None:
            scores.append(step_scores(logits, token, settings.logprobs))
        yield token
        if step + 1 == settings.max_new_tokens:
            state.finish = "length"
            return
        if should_stop():
            return
        logits, cache = decode_step(model, token, cache, position)
        position += 1
        state.cache, state.fed = cache, step + 1


class IncrementalDecoder:
    """Token ids → text increments that never split a multi-byte character (decodes a small window each step)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        # a partial character is held back, but never more than 4 tokens: a UTF-8 character has at most 4 bytes,
        # so past that the bytes are simply invalid and are shown as they are
        complete = not after.endswith("\ufffd") or len(self.ids) - self.read > 4
        if len(after) > len(before) and complete:
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def finish(self) -> str:
        """The rest of the text (a trailing partial character is dropped, as the full decode does)."""
        full = self.decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta

"""The contract between the front ends (web chat, API, command line, evaluation) and a backend: the `Backend`
protocol, and the typed events its `stream` yields: `Progress` before the first token, `Delta` as the answer
grows, then one `Result`; token probabilities, when asked for, ride on both as `TokenLogprob` records. The local
engine (llava_ui/engine) and a remote engine (remote.py) both implement it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Protocol

from llava_ui.chat.conversation import Conversation
from llava_ui.config import GenerationSettings


@dataclass
class Progress:
    """Between model steps before the first token: vision counts images (or frames) encoded, prefill counts
    prompt positions; `eta_s` is the time to the first token at this machine's measured rates."""

    stage: str  # "queued" (done: place in line, total: how many wait) | "vision" | "prefill"
    done: int
    total: int
    eta_s: float | None = None


@dataclass
class TopLogprob:
    """One of a step's likeliest tokens: its id (None from a remote engine: OpenAI's format has none), its text
    (its bytes decoded, a split character replaced by U+FFFD), its raw log-probability and its bytes."""

    token_id: int | None
    token: str
    logprob: float
    bytes: list[int]


@dataclass
class TokenLogprob(TopLogprob):
    """A generated token's raw log-probability (log-softmax of the logits before any sampling setting) and the
    step's best alternatives, best first."""

    top: list[TopLogprob] = field(default_factory=list)

    @classmethod
    def from_dict(cls, record: dict) -> "TokenLogprob":
        top = [TopLogprob(**t) for t in record.get("top") or []]
        return cls(**{k: v for k, v in record.items() if k != "top"}, top=top)


def token_logprob(scores, token_bytes: Callable[[int], bytes]) -> TokenLogprob:
    """A step's scores (model.logprobs.StepScores) with each token's bytes (`token_bytes(id)`) and text."""
    def entry(token_id: int, logprob: float) -> dict:
        raw = token_bytes(token_id)
        return dict(token_id=token_id, token=raw.decode("utf-8", errors="replace"), logprob=logprob,
                    bytes=list(raw))

    return TokenLogprob(**entry(scores.token_id, scores.logprob),
                        top=[TopLogprob(**entry(i, lp)) for i, lp in zip(scores.top_ids, scores.top_logprobs)])


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] | None = None  # asked for: the tokens this piece of text came from


@dataclass
class Stats:
    ttft_s: float | None = None
    decode_tokens_per_s: float | None = None
    generated_tokens: int | None = None
    prompt_tokens: int | None = None  # text + visual positions
    visual_tokens: int | None = None
    cached_prefix_tokens: int | None = None
    images_encoded: int | None = None
    images_from_cache: int | None = None
    total_s: float | None = None
    precision: str | None = None  # e.g. "bf16 on oneDNN (AMX)"
    weights: str | None = None  # how the language model's weights and KV cache were held (EngineOptions)
    decode_batch_mean: float | None = None  # how many chats shared this answer's decode steps, on average
    decode_batch_max: int | None = None


@dataclass
class Result:
    """How an answer ended: its text and ids, why it ended, the seed used, the prompt as rendered and its numbers."""

    text: str
    finish_reason: str  # "stop" | "length" | "stopped"
    seed: int | None = None
    token_ids: list[int] = field(default_factory=list)  # generated, without the stop token (empty from a remote)
    prompt: str = ""  # the ChatML text, <image> where each image goes
    image_mode: str | None = None
    dropped_turns: int = 0  # oldest turns left out to fit the context
    visual_tokens_per_image: list[int] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    logprobs: list[TokenLogprob] | None = None  # when asked for: one per generated token
    # when asked for: [token][layer][image] → the head-mean attention weight of each of the image's visual positions
    attention: list[list[list[list[float]]]] | None = None
    # when asked for: per generated token, its log-probability with the images minus without them
    image_effect: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "Result":
        fields = {k: v for k, v in record.items()
                  if k in cls.__dataclass_fields__ and k not in ("stats", "logprobs")}
        stats = {k: v for k, v in (record.get("stats") or {}).items() if k in Stats.__dataclass_fields__}
        logprobs = record.get("logprobs")
        return cls(**fields, stats=Stats(**stats),
                   logprobs=None if logprobs is None else [TokenLogprob.from_dict(t) for t in logprobs])


Event = Progress | Delta | Result


def timed_stats(started: float, times: list[float], steps: int | None = None, **counts) -> Stats:
    """Stats from the times the answer's pieces arrived: first token, then `steps` decode steps (one per piece
    after the first, unless a remote server packed several tokens into one piece) over the time they took."""
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    steps = len(times) - 1 if steps is None else steps
    return Stats(ttft_s=times[0] - started if times else None,
                 decode_tokens_per_s=steps / span if span > 0 and steps > 0 else None,
                 total_s=time.perf_counter() - started, **counts)


class Backend(Protocol):
    """What every front end uses (docs/engine-api.md)."""

    def load(self) -> "Backend": ...

    def load_in_background(self) -> threading.Thread: ...

    def status(self) -> dict: ...

    def default_frames(self) -> int: ...

    def estimate(self, image_sizes: list[tuple[int, int]], frames: int = 0, image_mode: str | None = None,
                 text_tokens: int = 64) -> tuple[int, float] | None: ...

    def stream(self, conversation: Conversation, settings: GenerationSettings | None = None,
               image_mode: str | None = None, stop_event: threading.Event | None = None) -> Iterator[Event]: ...

    def generate(self, conversation: Conversation, settings: GenerationSettings | None = None, **kwargs) -> Result: ...


def generate(backend: Backend, conversation: Conversation, settings: GenerationSettings | None = None,
             **kwargs) -> Result:
    """`stream` consumed: the Result."""
    result = None
    for event in backend.stream(conversation, settings, **kwargs):
        result = event if isinstance(event, Result) else result
    return result

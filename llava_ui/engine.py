"""The singleton backend every front end talks to: load once, plan a request, stream tokens, stop on demand.

Requests are served concurrently by interleaving model steps under one lock: each prefill chunk (256 prompt
positions on a CPU) and each decode step holds the model alone, so concurrent chats all stream (more slowly) and
never mix, and a long prompt does not hold the others up for its whole prefill; see README "Concurrency".
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

from . import DEFAULT_MODEL
from .behaviours import check_image_mode, default_image_mode, pixel_views, prepare_images
from .caches import FeatureCache, PrefixCache
from .config import GenerationSettings
from .conversation import Conversation
from .errors import UserError
from .generate import IncrementalDecoder, generate_ids
from .model import IMAGE_MARKER
from .prompt import render_prompt
from .stopping import StopStrings

VISION_BATCH = {"cpu": 1}  # per device type; a CPU gains little from batching and a stop waits a whole batch


@dataclass
class Plan:
    """Everything known about a request before any compute."""

    prompt_ids: list[int]
    images: list  # PreparedImage per marker, in order
    pil_images: list
    prompt: str
    prompt_tokens: int
    visual_tokens: int
    max_new_tokens: int
    dropped_turns: int
    image_mode: str


@dataclass
class LoadState:
    state: str = "not_loaded"  # not_loaded | loading | ready | failed
    message: str = ""
    error: str = ""
    device: str = ""
    dtype: str = ""
    layout: str = ""
    random_weights: bool = False
    history: list = field(default_factory=list)


def pick_device(requested: str | None = None) -> str:
    import paddle

    if requested:
        return requested
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return "gpu"
    return "cpu"


def pick_dtype(device: str, requested: str | None = None) -> str:
    import paddle

    if requested:
        return requested
    if device.startswith("gpu"):
        return "bfloat16" if paddle.amp.is_bfloat16_supported() else "float16"
    return "float32"  # Paddle CPU has no bf16/fp16 matmul kernels, whatever is_bfloat16_supported() says


class Engine:
    def __init__(self, model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
                 image_mode: str | None = None, context_length: int | None = None,
                 feature_cache_mb: int = 256, prefix_cache_mb: int = 1024, prefix_cache_entries: int = 4):
        self.model_id = model
        self.requested = (device, dtype, image_mode, context_length)
        self.load_state = LoadState()
        self.features = FeatureCache(feature_cache_mb << 20)
        self.prefixes = PrefixCache(prefix_cache_mb << 20, prefix_cache_entries)
        self.model = self.tokenizer = self.config = None
        self.on_progress = None  # e.g. the command line prints load progress to stderr
        self.model_dir = None  # the resolved checkpoint folder, once loaded
        self._load_lock = threading.Lock()
        self.compute_lock = threading.Lock()

    def status(self) -> dict:
        s = self.load_state
        return {"state": s.state, "message": s.message, "error": s.error, "model": self.model_id,
                "device": s.device, "dtype": s.dtype, "layout": s.layout, "random_weights": s.random_weights,
                "image_mode": self.image_mode if s.state == "ready" else None,
                "context_length": self.context_length if s.state == "ready" else None}

    def _progress(self, message: str) -> None:
        self.load_state.message = message
        self.load_state.history.append(message)
        if self.on_progress is not None:
            self.on_progress(message)

    def load(self) -> "Engine":
        """Load once; concurrent callers wait for the same load. After a failure, the next call tries again."""
        if self.load_state.state == "ready":
            return self
        with self._load_lock:
            if self.load_state.state == "ready":
                return self
            self.load_state = LoadState(state="loading", message="starting")
            try:
                self._load()
            except Exception as err:  # keep serving: the state says why and a later call retries
                reason = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
                self.load_state.state, self.load_state.error = "failed", reason
                self.load_state.message = f"model failed to load: {reason}"
                raise UserError(f"the model failed to load: {reason}") from None
            self.load_state.state, self.load_state.message = "ready", "ready"
        return self

    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=lambda: _swallow(self.load), name="model-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        import paddle

        from .checkpoints import build_model, resolve_model_dir
        from .prompt import load_tokenizer

        device_req, dtype_req, mode_req, context_req = self.requested
        device = pick_device(device_req)
        dtype = pick_dtype(device, dtype_req)
        paddle.set_device(device)
        paddle.set_grad_enabled(False)  # the product never trains; grad state is global, not per thread
        model_dir = resolve_model_dir(self.model_id, self._progress)
        self.model_dir = model_dir
        model, config, layout = build_model(model_dir, dtype, self._progress)
        self._progress("loading the tokenizer ...")
        self.tokenizer = load_tokenizer(model_dir)
        has_newline = model.image_newline is not None
        self.image_mode = check_image_mode(mode_req, has_newline) if mode_req else default_image_mode(config, has_newline)
        self.context_length = min(context_req or config.context_length, config.context_length)
        self.model, self.config = model, config
        self.load_state.device, self.load_state.dtype, self.load_state.layout = device, dtype, layout
        self.load_state.random_weights = bool(config.raw.get("random_weights"))

    def plan(self, conversation: Conversation, image_mode: str | None = None, max_new_tokens: int = 1024) -> Plan:
        """Render, tokenize and count; drop the oldest turns when the history no longer fits the context."""
        self.load()
        mode = check_image_mode(image_mode, self.model.image_newline is not None) if image_mode else self.image_mode
        conversation.pending()
        turns = conversation.turns
        for dropped in range(len(turns)):
            kept = turns[dropped:]
            media = conversation.media(kept)
            images = prepare_images([m[0] for m in media], mode, self.config, [m[1] for m in media],
                                    has_video=any(turn.video is not None for turn in kept))
            messages = conversation.messages(kept)
            ids = self.tokenizer.encode_prompt(conversation.system, messages)
            visual = sum(p.tokens for p in images)
            total = len(ids) - len(images) + visual
            if total < self.context_length:
                return Plan(ids, images, [m[0] for m in media], render_prompt(conversation.system, messages),
                            total, visual, min(max_new_tokens, self.context_length - total), dropped, mode)
        n, text = len(images), total - visual
        per_image = max(visual // max(n, 1), 1)
        fit = max(0, (self.context_length - 1 - text) // per_image)
        hint = "attach fewer images or lower the frame count"
        if mode == "trained" and n == 1 and per_image > self.config.vision.num_patches + 1:
            hint = "this lone image uses anyres tiles in 'trained' mode; 'eval' or 'flat' mode needs about 730 tokens"
        raise UserError(f"this message needs {total:,} tokens ({n} image{'s' * (n != 1)} or frames take {visual:,}, "
                        f"{per_image:,} each) but the context holds {self.context_length:,} and the text takes "
                        f"{text:,}: there is room for at most {fit} image{'s' * (fit != 1)} or frame"
                        f"{'s' * (fit != 1)}; {hint}")

    def image_rows(self, plan: Plan, stop_event: threading.Event | None = None) -> tuple[list, int]:
        """Packed feature rows per image; only images not in the feature cache go through the vision tower.
        A stop request is honoured between vision batches (the rows then stay partly None)."""
        rows, todo = [None] * len(plan.images), []
        for i, prepared in enumerate(plan.images):
            rows[i] = self.features.get(prepared.cache_key)
            if rows[i] is None:
                todo.append(i)
        batch_size = VISION_BATCH.get(self.load_state.device.split(":")[0], 8)
        for start in range(0, len(todo), batch_size):
            if stop_event is not None and stop_event.is_set():
                break
            batch = todo[start:start + batch_size]
            pixels = [pixel_views(plan.pil_images[i], plan.images[i], self.config) for i in batch]
            with self.compute_lock:
                import numpy as np

                features = self.model.encode_views(np.concatenate(pixels))
                offset = 0
                for i, views in zip(batch, pixels):
                    p = plan.images[i]
                    rows[i] = self.model.pack_image(features[offset:offset + len(views)], p.pack, p.size, p.grid)
                    offset += len(views)
            for i in batch:
                self.features.put(plan.images[i].cache_key, rows[i])
        return rows, len(todo)

    def stream(self, conversation: Conversation, settings: GenerationSettings | None = None,
               image_mode: str | None = None, stop_event: threading.Event | None = None) -> Iterator[dict]:
        """Answer the conversation's last message: yields {"type": "delta", "text"} events, then {"type": "done", ...}
        with the text, generated ids, finish reason and stats; the answer (even a stopped one) is kept in the turn."""
        started = time.perf_counter()
        settings = (settings or GenerationSettings()).validate()
        stop_event = stop_event or threading.Event()
        plan = self.plan(conversation, image_mode, settings.max_new_tokens)
        seed = settings.seed if settings.seed is not None else random.randrange(2**31)
        run = GenerationSettings(**{**asdict(settings), "max_new_tokens": plan.max_new_tokens, "seed": seed})
        turn = conversation.pending()
        rows, encoded = self.image_rows(plan, stop_event)
        if stop_event.is_set():  # stopped before the prompt was computed: nothing to say
            turn.answer = ""
            yield _final(plan, "", [], "stopped", seed, started, None, 0, encoded)
            return
        items, sizes = _items(plan)
        matched, cached_positions, kv = self.prefixes.match(items)
        rest_ids = plan.prompt_ids[matched:]
        rest_rows = rows[sum(1 for t in plan.prompt_ids[:matched] if t == IMAGE_MARKER):]
        with self.compute_lock:
            embeds = self.model.embed_prompt(rest_ids, rest_rows)
        decoder = IncrementalDecoder(self.tokenizer.decode)
        stops = StopStrings(settings.stop)
        state, token_ids, times = {}, [], []
        reason = "length"
        tokens = generate_ids(self.model, embeds, run, self.tokenizer.stop_ids, cache=kv, start=cached_positions,
                              seen=[t for t in plan.prompt_ids if t >= 0], should_stop=stop_event.is_set,
                              lock=self.compute_lock, state=state)
        try:
            for token in tokens:
                token_ids.append(token)
                times.append(time.perf_counter())
                delta, hit = stops.feed(decoder.push(token))
                if delta:
                    yield {"type": "delta", "text": delta}
                if hit:
                    reason = "stop"
                    break
            else:
                reason = "stopped" if stop_event.is_set() else state.get("finish", "length")
            if reason != "stop":
                delta, _ = stops.feed(decoder.finish(), final=True)
                if delta:
                    yield {"type": "delta", "text": delta}
        finally:
            tokens.close()
            turn.answer = stops.text
            if state.get("cache") is not None:
                fed = state["fed"]
                self.prefixes.store(items + token_ids[:fed], sizes + [1] * fed, state["cache"])
        yield _final(plan, stops.text, token_ids, reason, seed, started, times, cached_positions, encoded)

    def generate(self, conversation: Conversation, settings: GenerationSettings | None = None, **kwargs) -> dict:
        final = None
        for event in self.stream(conversation, settings, **kwargs):
            final = event
        return final


def _final(plan: Plan, text: str, token_ids: list[int], reason: str, seed: int, started: float, times,
           cached_positions: int, encoded: int) -> dict:
    times = times or []
    first = times[0] - started if times else None
    decode_rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return {
        "type": "done", "text": text, "token_ids": token_ids, "finish_reason": reason, "seed": seed,
        "prompt": plan.prompt, "image_mode": plan.image_mode, "dropped_turns": plan.dropped_turns,
        "visual_tokens_per_image": [p.tokens for p in plan.images],
        "stats": {"ttft_s": first, "decode_tokens_per_s": decode_rate, "generated_tokens": len(token_ids),
                  "prompt_tokens": plan.prompt_tokens, "visual_tokens": plan.visual_tokens,
                  "cached_prefix_tokens": cached_positions, "images_encoded": encoded,
                  "images_from_cache": len(plan.images) - encoded, "total_s": time.perf_counter() - started},
    }


def _items(plan: Plan) -> tuple[list, list[int]]:
    """Prompt items for prefix matching: token ids, and one key per image spanning its visual tokens."""
    items, sizes, k = [], [], 0
    for t in plan.prompt_ids:
        if t == IMAGE_MARKER:
            items.append(plan.images[k].cache_key)
            sizes.append(plan.images[k].tokens)
            k += 1
        else:
            items.append(t)
            sizes.append(1)
    return items, sizes


def _swallow(fn) -> None:
    try:
        fn()
    except UserError:
        pass  # the failure is in load_state for the front end to show


_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(model: str = DEFAULT_MODEL, **options) -> Engine:
    """The process-wide engine for these settings (one model per process in practice)."""
    key = (model, tuple(sorted(options.items())))
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = Engine(model, **options)
        return _ENGINES[key]

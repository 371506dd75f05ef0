"""The singleton backend every front end talks to: load once, plan a request, stream tokens, stop on demand.

Every model step runs in the engine's one compute thread (scheduler.py), whichever thread asked: one vision
view, one prefill chunk or one decode token at a time, so concurrent chats all stream (more slowly) and never mix,
a long prompt does not hold the others up for its whole prefill, and a stop or a client that left ends the work at
the next step. Between steps the stream reports progress with the time left at this machine's measured rates.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

import paddle

from llava_ui import DEFAULT_MODEL
from llava_ui.backends.base import Delta, Event, Progress, Result, generate, timed_stats, token_logprob
from llava_ui.backends.admission import POLL_S, Admission
from llava_ui.backends.rates import MAX_DEFAULT_FRAMES, Rates, Workload, calibrate
from llava_ui.chat.conversation import Conversation
from llava_ui.chat.prompt import IMAGE_MARKER
from llava_ui.chat.stopping import StopStrings
from llava_ui.checkpoints.hub import model_source
from llava_ui.checkpoints.load import build_model, load_tokenizer, resolve_model_dir
from llava_ui.config import GenerationSettings
from llava_ui.errors import Stopped, UserError
from llava_ui.engine.caches import FeatureCache, PrefixCache
from llava_ui.engine.plan import Plan, check_attention_size, estimate_work, plan_conversation, prompt_items
from llava_ui.engine.scheduler import ComputeThread
from llava_ui.engine.steps import Decoding, IncrementalDecoder, Prefilled, decode_room, decode_tokens, prefill_chunks
from llava_ui.model.attention_rows import attention_rows
from llava_ui.model.image_effect import image_effect, logprobs_without_images
from llava_ui.model.options import EngineOptions, options as choose_options
from llava_ui.model.processing import check_image_mode, default_image_mode, pixel_views


@dataclass
class LoadState:
    state: str = "not_loaded"  # not_loaded | loading | ready | failed
    message: str = ""
    error: str = ""
    layout: str = ""  # the checkpoint's (how the engine computes is self.options)
    random_weights: bool = False


class Engine:
    def __init__(self, model: str = DEFAULT_MODEL, hub: str | None = None, device: str | None = None,
                 dtype: str | None = None,
                 image_mode: str | None = None, context_length: int | None = None,
                 feature_cache_mb: int = 256, prefix_cache_mb: int = 1024, prefix_cache_entries: int = 4,
                 batch_slots: int = 8, bf16_kernel: bool | None = None, weights: str | None = None):
        """`batch_slots`: the most chats one decode step carries (1: one stream, e.g. the command line); with the
        device and dtype it decides how the weights are held (options.options, which says what `bf16_kernel`
        does); `weights` "int8": the language model's weights as int8 (--weights, options.options)."""
        self.model_id, self.hub = model, hub
        self.requested = (device, dtype, image_mode, context_length)
        self.batch_slots, self.bf16_kernel, self.weights = batch_slots, bf16_kernel, weights
        self.options: EngineOptions | None = None  # how this engine computes, once loaded
        self.load_state = LoadState()
        self.features = FeatureCache(feature_cache_mb << 20)
        self.prefixes = PrefixCache(prefix_cache_mb << 20, prefix_cache_entries)
        self.model = self.tokenizer = self.config = None
        self.on_progress = None  # on_progress(message, done, total): e.g. the command line's bars
        self.model_dir = None  # the resolved checkpoint folder, once loaded
        self.rates: Rates | None = None  # this machine's measured speed per stage, once loaded
        self._load_lock = threading.Lock()
        self.compute = ComputeThread(batch_slots)  # every model step runs there (grad off, the CPU set up once)
        self.admission = Admission()  # answers at once and waiting, for every front end (serve sets the sizes)
        self.run = self.compute.run

    def status(self) -> dict:
        s, o = self.load_state, self.options
        return {"state": s.state, "message": s.message, "error": s.error, "model": self.model_id,
                "source": model_source(self.model_id, self.hub),
                "device": o.device if o else "", "dtype": o.dtype if o else "",
                "precision": o.policy.precision if o else "", "device_reason": o.policy.reason if o else "",
                "layout": s.layout,
                "weight_layout": o.layout if o else "",
                "options": o.summary() if o else None,
                "random_weights": s.random_weights,
                "image_mode": self.image_mode if s.state == "ready" else None,
                "unpad_rounding": self.config.unpad_rounding if s.state == "ready" else None,
                "context_length": self.context_length if s.state == "ready" else None,
                "caches": {"feature_bytes": self.features.bytes, "feature_entries": len(self.features),
                           "prefix_bytes": self.prefixes.bytes, "prefix_entries": len(self.prefixes)},
                "rates": self.rates.summary() if self.rates is not None else None,
                "admission": self.admission.status(), "last_decode_batch": self.compute.last_batch,
                "decode_steps": {size: {"steps": n, "mean_ms": round(1000 * seconds / n, 1)}
                                 for size, (n, seconds) in sorted(list(self.compute.steps.items())) if n}}

    def _progress(self, message: str, done: int | None = None, total: int | None = None) -> None:
        """A loading step (with a count when it has one), for the status and `on_progress(message, done, total)`."""
        self.load_state.message = message if done is None else f"{message} ({100 * done // max(total, 1)} %)"
        if self.on_progress is not None:
            self.on_progress(message, done, total)

    def load(self) -> "Engine":
        """Load once; concurrent callers wait for the same load. After a failure, the next call tries again."""
        if self.load_state.state == "ready":
            return self
        with self._load_lock:
            if self.load_state.state == "ready":
                return self
            self.load_state = LoadState(state="loading", message="starting")
            try:
                self.run(self._load)
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
        device_req, dtype_req, mode_req, context_req = self.requested
        options = choose_options(device_req, dtype_req, self.batch_slots, self._progress, self.bf16_kernel,
                                 self.weights)
        paddle.set_device(options.device)
        model_dir = resolve_model_dir(self.model_id, self._progress, self.hub)
        self.model_dir = model_dir
        # a bf16 CPU engine: the vision tower becomes oneDNN bf16 programs before the language model loads (a
        # lower peak), which the CPU kernels hold in bf16 (or int8)
        model, config, layout = build_model(model_dir, options.policy.weights_dtype, self._progress, options.layout,
                                            bf16_vision=options.bf16_vision)
        if options.bf16_vision:
            self._progress(f"bf16 vision programs ready in {model.bf16.prepare_seconds:.0f} s "
                           f"(exported in {model.bf16.export_seconds:.0f} s)")
        self._progress("loading the tokenizer ...")
        self.tokenizer = load_tokenizer(model_dir)
        has_newline = model.image_newline is not None
        self.image_mode = check_image_mode(mode_req, has_newline) if mode_req else default_image_mode(config, has_newline)
        self.context_length = min(context_req or config.context_length, config.context_length)
        self.model, self.config = model, config
        self.options = options
        self.load_state.layout, self.load_state.random_weights = layout, bool(config.raw.get("random_weights"))
        self._progress("measuring this machine's speed ...")
        self.rates = Rates(Workload.of(config), calibrate("float32" if options.on_cpu else options.dtype))

    def default_frames(self) -> int:
        """Video frames by default: 16 on a GPU; on a CPU as many (up to 16) as answer within about a minute at
        the rates measured here (16 until the model is loaded)."""
        if self.rates is None or not self.options.on_cpu:
            return MAX_DEFAULT_FRAMES
        return self.rates.frames_within()

    def estimate(self, image_sizes: list[tuple[int, int]], frames: int = 0, image_mode: str | None = None,
                 text_tokens: int = 64) -> tuple[int, float] | None:
        """(prompt tokens, seconds to the first token here) for a message with images of these sizes and a video
        of `frames` frames, before anything is decoded; None until the model is loaded."""
        if self.rates is None:
            return None
        tokens, views = estimate_work(image_sizes, frames, image_mode or self.image_mode, self.config, text_tokens)
        return tokens, self.rates.seconds(views=views, positions=tokens)

    def plan(self, conversation: Conversation, image_mode: str | None = None, max_new_tokens: int = 1024) -> Plan:
        """Render, tokenize and count (plan.plan_conversation)."""
        self.load()
        mode = check_image_mode(image_mode, self.model.image_newline is not None) if image_mode else self.image_mode
        return plan_conversation(conversation, self.tokenizer, self.config, mode, self.context_length, max_new_tokens)

    def image_rows(self, plan: Plan, stop_event: threading.Event | None = None) -> tuple[list, int]:
        """Packed feature rows per image (see encode_images), all at once: (rows, images encoded)."""
        rows, encoded = [None] * len(plan.images), set()
        for _ in self.encode_images(plan, rows, stop_event, encoded):
            pass
        return rows, len(encoded)

    def encode_images(self, plan: Plan, rows: list, stop_event: threading.Event | None = None,
                      encoded: set | None = None) -> Iterator[int]:
        """Fill `rows` with each image's packed feature rows; only images not in the feature cache go through the
        vision tower, one view per model step. Yields after each view the number of views left; `encoded` gets
        the cache key of every image encoded. A stop request is honoured between views (the rows then stay
        partly None)."""
        encoded = set() if encoded is None else encoded
        todo = []
        for i, prepared in enumerate(plan.images):
            rows[i] = self.features.get(prepared.cache_key)
            if rows[i] is None:
                todo.append(i)
        left = sum(plan.images[i].views for i in todo)
        for i in todo:
            prepared = plan.images[i]
            pixels = pixel_views(plan.pil_images[i], prepared, self.config)
            features = []
            for view in range(len(pixels)):
                if stop_event is not None and stop_event.is_set():
                    return
                view_features = self.run(self._encode_view, pixels[view:view + 1], stop_event)
                if view_features is None:  # stopped inside the view
                    return
                features.append(view_features)
                left -= 1
                if view + 1 < len(pixels):
                    yield left
            rows[i] = self.run(self._pack, features, prepared)
            self.features.put(prepared.cache_key, rows[i])
            encoded.add(prepared.cache_key)
            yield left

    def _encode_view(self, pixels, stop_event: threading.Event | None = None):
        began = time.perf_counter()
        try:
            features = self.model.encode_views(pixels, stop_event.is_set if stop_event is not None else None)
        except Stopped:
            return None
        float(features[0, 0, 0])  # the device has finished: the time below is the view's
        self.rates.record("vision", self.rates.workload.vision_view, time.perf_counter() - began)
        return features

    def _pack(self, features: list, prepared):
        views = features[0] if len(features) == 1 else paddle.concat(features)
        return self.model.pack_image(views, prepared.pack, prepared.grid, prepared.crop)

    def stream(self, conversation: Conversation, settings: GenerationSettings | None = None,
               image_mode: str | None = None, stop_event: threading.Event | None = None) -> Iterator[Event]:
        """Answer the conversation's last message. Yields Progress("queued") while it waits for a slot (the
        admission queue: ServerBusy when it is full), Progress between the steps before the first token, Delta
        as the answer grows, then one Result (text, generated ids, finish reason, stats); the answer (even a
        stopped one) is kept in the turn."""
        stop_event = stop_event or threading.Event()
        self.load()
        ticket = self.admission.join()
        try:
            while not self.admission.wait(ticket, POLL_S):
                if stop_event.is_set():
                    break  # the answer below ends at once, stopped
                place, waiting = self.admission.position(ticket)
                yield Progress("queued", place, waiting)
            yield from self._answer(conversation, settings, image_mode, stop_event)
        finally:
            self.admission.cancel(ticket)

    def _answer(self, conversation: Conversation, settings: GenerationSettings | None, image_mode: str | None,
                stop_event: threading.Event) -> Iterator[Event]:
        """The request's phases in order: plan, the images not cached yet, the prefill after the longest cached
        prefix, the decode loop; then what the inspector asked for."""
        started = time.perf_counter()
        settings = (settings or GenerationSettings()).validate()
        plan = self.plan(conversation, image_mode, settings.max_new_tokens)
        seed = settings.seed if settings.seed is not None else random.randrange(2**31)
        run = GenerationSettings(**{**asdict(settings), "max_new_tokens": plan.max_new_tokens, "seed": seed})
        if run.attention:
            check_attention_size(plan.visual_tokens, run.max_new_tokens, self.config.text["num_hidden_layers"])
        turn = conversation.pending()
        items, sizes = prompt_items(plan)
        rows = [None] * len(plan.images)
        encoded = yield from self._encode(plan, items, rows, stop_event)
        if stop_event.is_set():  # stopped before the prompt was computed: nothing to say
            turn.answer = ""
            yield _result(plan, "", [], "stopped", seed, started, None, 0, encoded, self.options)
            return
        matched, cached_positions, kv = self.prefixes.match(items)
        result = yield from self._prefill(plan, rows, matched, cached_positions, kv, run, stop_event)
        answer = _Answer(StopStrings(settings.stop))
        yield from self._decode(plan, run, result, items, sizes, answer, turn, stop_event)
        final = _result(plan, answer.stops.text, answer.token_ids, answer.reason, seed, started, answer.times,
                        cached_positions, encoded, self.options, answer.shared, answer.named)
        if run.attention and not stop_event.is_set():
            final.attention = self.run(self._attention, plan, rows, answer.token_ids) if answer.token_ids else []
        if run.image_effect and not stop_event.is_set():
            without = self.run(logprobs_without_images, self.model, plan.prompt_ids, answer.token_ids)
            final.image_effect = image_effect(answer.seen_logprobs, without)
        yield final

    def _encode(self, plan: Plan, items: list, rows: list, stop_event: threading.Event) -> Iterator[Event]:
        """The images not in the feature cache through the vision tower, with progress; returns how many."""
        to_encode = [p for p in plan.images if self.features.get(p.cache_key) is None]
        total_images, views = len(to_encode), sum(p.views for p in to_encode)
        _, cached, _ = self.prefixes.match(items)  # an estimate: the entry may change before the prefill
        prompt_left = plan.prompt_tokens - cached
        if total_images:
            yield self._progress_event("vision", 0, total_images, views, cached, prompt_left)
        fresh = set()
        for views_left in self.encode_images(plan, rows, stop_event, fresh):
            done = sum(1 for p in to_encode if p.cache_key in fresh)
            yield self._progress_event("vision", done, total_images, views_left, cached, prompt_left)
        return len(fresh)

    def _prefill(self, plan: Plan, rows: list, matched: int, cached_positions: int, kv, run: GenerationSettings,
                 stop_event: threading.Event) -> Iterator[Event]:
        """The prompt after its cached prefix (`matched` items, `cached_positions` positions, their cache `kv`),
        chunk by chunk with progress; returns the Prefilled (its logits None when stopped)."""
        rest_ids = plan.prompt_ids[matched:]
        rest_rows = rows[sum(1 for t in plan.prompt_ids[:matched] if t == IMAGE_MARKER):]
        embeds = self.run(self.model.embed_prompt, rest_ids, rest_rows)
        result = Prefilled()
        for chunk in prefill_chunks(self.model, embeds, kv, cached_positions, room=decode_room(run), run=self.run,
                                    should_stop=stop_event.is_set, result=result):
            self.rates.record("prefill", self.rates.workload.prefill(chunk.start, chunk.length), chunk.seconds)
            if chunk.done < chunk.total:
                yield self._progress_event("prefill", chunk.done, chunk.total, 0, cached_positions + chunk.done,
                                           chunk.total - chunk.done)
        return result

    def _decode(self, plan: Plan, run: GenerationSettings, result: Prefilled, items: list, sizes: list,
                answer: "_Answer", turn, stop_event: threading.Event) -> Iterator[Event]:
        """The decode loop from the prefill's logits, batched with the other chats' steps: Deltas as the text grows
        (with their tokens' log-probabilities when asked for); `answer` gets the tokens, the text and why it
        ended, and the turn its text even when the client leaves mid-answer. The cache, with the answer's tokens,
        goes to the prefix cache for the next turn."""
        decoder = IncrementalDecoder(self.tokenizer.decode)
        stops, state = answer.stops, Decoding()
        # asked for: each token's scores, named (TokenLogprob), and how many of them the Deltas carried so far
        scores, answer.named, sent = ([], [], 0) if run.logprobs is not None else (None, None, 0)
        named = answer.named
        if run.image_effect:  # the tokens' log-probabilities with the images: the step's scores, no alternatives
            scores = [] if scores is None else scores
            if run.logprobs is None:
                run = replace(run, logprobs=0)
        if result.logits is None:  # stopped between two prefill chunks
            tokens = _no_tokens()
        else:
            tokens = decode_tokens(self.model, result.logits, result.cache, result.positions, run,
                                   self.tokenizer.stop_ids, seen=[t for t in plan.prompt_ids if t >= 0],
                                   should_stop=stop_event.is_set, run=self.run, state=state,
                                   decode_step=lambda *step: self.compute.decode(*step, answer.shared), scores=scores)
        result.logits = result.cache = None  # the decode loop holds the cache from here (state.cache)
        with self.compute.decoding():  # while it decodes, the batched step waits for this chat's steps
            try:
                for token in tokens:
                    answer.token_ids.append(token)
                    answer.times.append(time.perf_counter())
                    if scores is not None:
                        step = scores.pop()
                        if run.image_effect:
                            answer.seen_logprobs.append(step.logprob)
                        if named is not None:
                            named.append(token_logprob(step, self.tokenizer.token_bytes))
                    delta, hit = stops.feed(decoder.push(token))
                    if delta:
                        yield Delta(delta, None if named is None else named[sent:])
                        sent = len(named or ())
                    if hit:
                        answer.reason = "stop"
                        break
                else:
                    answer.reason = "stopped" if stop_event.is_set() else state.finish
                if answer.reason != "stop":
                    delta, _ = stops.feed(decoder.finish(), final=True)
                    if delta:
                        yield Delta(delta, None if named is None else named[sent:])
                        sent = len(named or ())
                if named is not None and sent < len(named):  # tokens whose text was held back or cut at a stop
                    yield Delta("", named[sent:])
            finally:
                tokens.close()
                turn.answer = stops.text
                if state.cache is not None:
                    fed = state.fed
                    self.prefixes.store(items + answer.token_ids[:fed], sizes + [1] * fed, state.cache)

    def _attention(self, plan: Plan, rows: list, token_ids: list[int]) -> list:
        """Each generated token's attention over the images (attention_rows), read after the answer."""
        embeds = self.model.embed_prompt(plan.prompt_ids + token_ids[:-1], rows)
        spans, position = [], 0
        for t in plan.prompt_ids:
            if t == IMAGE_MARKER:
                size = plan.images[len(spans)].tokens
                spans.append((position, position + size))
                position += size
            else:
                position += 1
        return attention_rows(self.model, embeds, plan.prompt_tokens, spans)

    def _progress_event(self, stage: str, done: int, total: int, views_left: int, start: int,
                        positions: int) -> Progress:
        eta = self.rates.seconds(views=views_left, start=start, positions=positions)
        return Progress(stage, done, total, round(eta, 1))

    def prompt_tokens(self, plan: Plan, settings: GenerationSettings, stop_ids=(), seen=()) -> Iterator[int]:
        """Generated token ids for a ready prompt (a Plan built by the caller, e.g. the evaluation's reference
        prompting): its images through the feature cache, then prefill and decode in the compute thread; no
        prefix cache, no text. Ends at a stop id (not yielded) or max_new_tokens."""
        rows, _ = self.image_rows(plan)
        embeds = self.run(self.model.embed_prompt, plan.prompt_ids, rows)
        result = Prefilled()
        for _ in prefill_chunks(self.model, embeds, None, 0, room=decode_room(settings), run=self.run, result=result):
            pass
        length = embeds.shape[1]
        del embeds
        with self.compute.decoding():  # batched with every other request decoding (eval --parallel)
            yield from decode_tokens(self.model, result.logits, result.cache, length, settings,
                                     set(stop_ids), seen=list(seen), run=self.run, decode_step=self.compute.decode)

    def generate(self, conversation: Conversation, settings: GenerationSettings | None = None, **kwargs) -> Result:
        return generate(self, conversation, settings, **kwargs)


@dataclass
class _Answer:
    """What the decode phase leaves for the final Result."""

    stops: StopStrings
    token_ids: list = field(default_factory=list)
    times: list = field(default_factory=list)  # when each token came
    shared: list = field(default_factory=list)  # how many chats shared each of its decode steps
    reason: str = "length"
    named: list | None = None  # its tokens' TokenLogprob, when asked for
    seen_logprobs: list = field(default_factory=list)  # the image effect's log-probabilities


def _result(plan: Plan, text: str, token_ids: list[int], reason: str, seed: int, started: float, times,
            cached_positions: int, encoded: int, options: EngineOptions, shared: list | None = None,
            logprobs: list | None = None) -> Result:
    stats = timed_stats(started, times or [], generated_tokens=len(token_ids), prompt_tokens=plan.prompt_tokens,
                        visual_tokens=plan.visual_tokens, cached_prefix_tokens=cached_positions,
                        images_encoded=encoded, images_from_cache=len(plan.images) - encoded,
                        precision=options.policy.precision, weights=f"{options.weights}; KV cache {options.kv_dtype}",
                        decode_batch_mean=sum(shared) / len(shared) if shared else None,
                        decode_batch_max=max(shared) if shared else None)
    return Result(text=text, finish_reason=reason, seed=seed, token_ids=token_ids, prompt=plan.prompt,
                  image_mode=plan.image_mode, dropped_turns=plan.dropped_turns,
                  visual_tokens_per_image=[p.tokens for p in plan.images], stats=stats, logprobs=logprobs)


def _no_tokens() -> Iterator[int]:
    yield from ()


def _swallow(fn) -> None:
    try:
        fn()
    except UserError as err:  # the failure is in load_state for the front end to show; the terminal hears it too
        logging.getLogger(__name__).error("%s", err)


_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(model: str = DEFAULT_MODEL, **options) -> Engine:
    """The process-wide engine for these settings (one model per process in practice)."""
    key = (model, tuple(sorted(options.items())))
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = Engine(model, **options)
        return _ENGINES[key]

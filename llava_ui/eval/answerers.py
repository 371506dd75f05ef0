"""`python -m llava_ui eval`: the benchmark runner wired to the local engine or a remote one.

Inference follows the reference (`llava/eval/model_vqa.py`, see docs/evaluation.md): greedy, at most
EVAL_MAX_NEW_TOKENS new tokens, the default system prompt, the answer stripped. With the local engine the prompt is
built token by token as the reference builds it:
- every `<image>` is followed by a "\\n" token;
- every question is a fresh block: system, user, assistant header. A later turn of a multi-turn sample follows the
  previous answer's generated ids directly (its stop token included, no newline after it).
The reference decoded with transformers' generate(), which also applies the checkpoint's generation_config.json: a
repetition_penalty found there (local model folder) is applied the same way, to the generated tokens only.
A remote engine renders its own chat prompt, so there the questions are sent with "<image>\\n" (a single-turn prompt is
then the same) and later turns become ordinary chat turns.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from llava_ui.engine import Engine
from llava_ui.engine.plan import Plan
from llava_ui.chat.conversation import Conversation
from llava_ui.chat.media import load_image
from llava_ui.chat.prompt import IM_END, IM_START, IMAGE_MARKER, IMAGE_TOKEN
from llava_ui.config import DEFAULT_SYSTEM_PROMPT, GenerationSettings
from llava_ui.errors import UserError
from llava_ui.eval.benchmark import EVAL_MAX_NEW_TOKENS
from llava_ui.model.processing import prepare_images

TRACE_FILE = "eval_trace.jsonl"  # one line per answered turn: the prompt as the model saw it, tokens, timing


def greedy_settings(max_new_tokens: int | None = None, repetition_penalty: float = 1.0) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=max_new_tokens or EVAL_MAX_NEW_TOKENS, temperature=0, seed=0,
                              repetition_penalty=repetition_penalty)


def checkpoint_repetition_penalty(model: str) -> float:
    """repetition_penalty of a local checkpoint folder's generation_config.json (1.0 when absent)."""
    try:
        return float(json.loads((Path(model) / "generation_config.json").read_text()).get("repetition_penalty") or 1.0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 1.0


def question_block(tokenizer, question: str, system: str = DEFAULT_SYSTEM_PROMPT) -> tuple[list[int], str]:
    """One question as model_vqa.py's preprocess_qwen tokenizes it: (ids with IMAGE_MARKER per image, the same as text).

    Each text chunk is tokenized on its own and every image is followed by the "\\n" token."""
    newline = tokenizer.encode_text("\n")
    start, end = tokenizer.special_ids[IM_START], tokenizer.special_ids[IM_END]
    ids = [start] + tokenizer.encode_text("system") + newline + tokenizer.encode_text(system) + [end] + newline
    ids += [start] + tokenizer.encode_text("user") + newline
    for i, chunk in enumerate(question.split(IMAGE_TOKEN)):
        if i:
            ids += [IMAGE_MARKER] + newline
        ids += tokenizer.encode_text(chunk)
    ids += [end] + newline + [start] + tokenizer.encode_text("assistant") + newline
    text = (f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n"
            f"{question.replace(IMAGE_TOKEN, IMAGE_TOKEN + chr(10))}{IM_END}\n{IM_START}assistant\n")
    return ids, text


class Unanswerable(UserError):
    """This sample cannot be put to the model: an unreadable image, more markers than images, a prompt too long."""


def _load_images(paths, count: int) -> list:
    if count > len(paths):
        raise Unanswerable(f"the questions hold {count} {IMAGE_TOKEN} markers but the sample has {len(paths)} images")
    try:
        return [load_image(path) for path in paths[:count]]
    except UserError as error:
        raise Unanswerable(str(error)) from None


class ReferenceAnswerer:
    """answer(messages, image_paths) for run_evaluation: the local engine prompted exactly as model_vqa.py does.

    Thread-safe: run_evaluation's --parallel workers each answer one sample at a time, and the sample's earlier
    answers (the next turn's prompt holds their generated ids) are kept per thread."""

    def __init__(self, engine, image_mode: str, trace_path: str | None = None, repetition_penalty: float = 1.0):
        self.engine, self.image_mode, self.trace_path = engine, image_mode, trace_path
        self.repetition_penalty = repetition_penalty
        self._sample = threading.local()
        self.turns = []  # (seconds, generated tokens, finish reason) per answered turn

    @property
    def answers(self) -> list[tuple[str, list[int], str]]:
        """This thread's sample's answers so far: (answer, raw ids, ids as text)."""
        if not hasattr(self._sample, "answers"):
            self._sample.answers = []
        return self._sample.answers

    def render(self, messages) -> tuple[list[int], str]:
        """The whole prompt of the last question; earlier answers as generated (re-tokenized if not generated here)."""
        tokenizer = self.engine.tokenizer
        ids, text, answered = [], "", 0
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                block_ids, block_text = question_block(tokenizer, content)
            elif answered < len(self.answers) and self.answers[answered][0] == content:
                _, block_ids, block_text = self.answers[answered]
                answered += 1
            else:
                block_ids, block_text = tokenizer.encode_text(content) + [tokenizer.special_ids[IM_END]], content + IM_END
            ids += block_ids
            text += block_text
        return ids, text

    def __call__(self, messages, image_paths) -> str:
        engine = self.engine
        if len(messages) == 1:
            self.answers.clear()  # a new sample
        started = time.perf_counter()
        ids, text = self.render(messages)
        images = _load_images(image_paths, ids.count(IMAGE_MARKER))
        prepared = prepare_images(images, self.image_mode, engine.config)
        visual = sum(p.tokens for p in prepared)
        total = len(ids) - len(prepared) + visual
        if total >= engine.context_length:
            raise Unanswerable(f"the prompt needs {total:,} tokens but the context holds {engine.context_length:,}")
        settings = greedy_settings(min(EVAL_MAX_NEW_TOKENS, engine.context_length - total), self.repetition_penalty)
        plan = Plan(prompt_ids=ids, images=prepared, pil_images=images, prompt=text, prompt_tokens=total,
                    visual_tokens=visual, max_new_tokens=settings.max_new_tokens, dropped_turns=0,
                    image_mode=self.image_mode)
        names = {i: name for name, i in engine.tokenizer.special_ids.items()}
        # Stop ids are watched here, not by the engine, because the next turn needs the one that was generated.
        # No `seen` prompt ids: transformers' generate() given embeddings penalises repeats of generated tokens only.
        tokens = engine.prompt_tokens(plan, settings)
        generated, stop = [], None
        try:
            for token in tokens:
                if token in engine.tokenizer.stop_ids:
                    stop = token
                    break
                generated.append(token)
        finally:
            tokens.close()
        decoded = engine.tokenizer.decode(generated)
        answer = decoded.strip()
        self.answers.append((answer, generated + [stop] * (stop is not None), decoded + names.get(stop, "")))
        seconds = time.perf_counter() - started
        finish = "stop" if stop is not None else "length"
        self.turns.append((seconds, len(generated), finish))
        _trace(self.trace_path, {"question": messages[-1]["content"], "images": list(image_paths[:len(images)]),
                                 "image_mode": self.image_mode, "prompt": text, "prompt_tokens": total,
                                 "visual_tokens_per_image": [p.tokens for p in prepared],
                                 "generated_tokens": len(generated), "finish_reason": finish,
                                 "repetition_penalty": self.repetition_penalty, "seconds": round(seconds, 3)})
        return answer


class ChatAnswerer:
    """answer(messages, image_paths) through any backend's generate(): used for a remote engine."""

    def __init__(self, backend, image_mode: str, trace_path: str | None = None):
        self.backend, self.image_mode, self.trace_path = backend, image_mode, trace_path
        self.turns = []

    def __call__(self, messages, image_paths) -> str:
        started = time.perf_counter()
        markers = [message["content"].count(IMAGE_TOKEN) for message in messages if message["role"] == "user"]
        images = iter(_load_images(image_paths, sum(markers)))
        conversation = Conversation()
        for message in messages:
            if message["role"] == "user":
                content = message["content"]
                pictures = [next(images) for _ in range(content.count(IMAGE_TOKEN))]
                try:
                    conversation.add_user(content.replace(IMAGE_TOKEN, IMAGE_TOKEN + "\n"), pictures)
                except UserError as error:  # e.g. a <video> marker in the text
                    raise Unanswerable(str(error)) from None
            else:
                conversation.turns[-1].answer = message["content"]
        final = self.backend.generate(conversation, greedy_settings(), image_mode=self.image_mode)
        seconds = time.perf_counter() - started
        stats = final.stats
        self.turns.append((seconds, stats.generated_tokens or 0, final.finish_reason))
        _trace(self.trace_path, {"question": messages[-1]["content"], "images": list(image_paths[:sum(markers)]),
                                 "image_mode": final.image_mode or self.image_mode, "prompt": final.prompt,
                                 "prompt_tokens": stats.prompt_tokens,
                                 "visual_tokens_per_image": final.visual_tokens_per_image,
                                 "generated_tokens": stats.generated_tokens,
                                 "finish_reason": final.finish_reason, "seconds": round(seconds, 3)})
        return final.text.strip()


def engine_answerer(backend, image_mode: str, trace_path: str | None = None, repetition_penalty: float = 1.0):
    """The reference prompting on the local engine; chat prompting through any other backend."""
    if isinstance(backend, Engine):
        return ReferenceAnswerer(backend, image_mode, trace_path, repetition_penalty)
    return ChatAnswerer(backend, image_mode, trace_path)


def skipping_unanswerable(answer, problems: list):
    """An Unanswerable turn, where the reference would crash, is answered "" (scored wrong: the reference's
    denominator counts it) and reported. Any other error (a remote engine failing, ...) stops the run."""

    def guarded(messages, image_paths):
        try:
            return answer(messages, image_paths)
        except Unanswerable as error:
            problems.append(str(error))
            print(f"\nunanswerable, scored as wrong: {messages[-1]['content'][:60]!r}: {error}", file=sys.stderr)
            return ""

    return guarded


_trace_lock = threading.Lock()  # parallel answerers append whole lines


def _trace(path: str | None, row: dict) -> None:
    if path:
        with _trace_lock, open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def model_name(model: str) -> str:
    """The model_id of the answer rows, as the reference's get_model_name_from_path: the folder or hub id's last part."""
    parts = str(model).rstrip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]

"""The one thread that runs the model: every model step of every request is handed to it and runs there.

Paddle keeps grad mode per thread: `paddle.set_grad_enabled(False)` in the thread that loaded the model leaves
autograd on in every other thread, so a server's worker threads would record history on each op and keep its
inputs alive. Handing the steps to one thread, configured once, makes the served path the command line's path.

Steps run in the order they were asked for, except decode steps: the decode steps of all chats that are decoding
run as one batched step (`LlavaQwen.decode_batch`: every weight read once for all of them), so N chats decode at
nearly the speed of one each. Continuous batching: a chat joins the batch with its first decode step and leaves
it when it stops asking. The other steps (a new chat's vision views and prefill chunks) run between two batched
steps, several in a row up to OTHER_SLICE_S: a chat that arrives while others decode reaches its first token
nearly as soon as alone, and the decoding chats pause at most that long.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future

from llava_ui.model.cpu import grad_off

THREAD_NAME = "llava-compute"
GATHER_S = 0.005  # how long a decode step waits for the other decoding chats' steps to arrive
OTHER_SLICE_S = 1.0  # other steps run in a row between two decode steps, until they have taken this long
FOLLOW_S = 0.003  # how long the loop waits for the next of those (its caller sends it once the last returned)


class _Decode:
    def __init__(self, model, token: int, cache, position: int):
        self.model, self.token, self.cache, self.position = model, token, cache, position
        self.future = Future()
        self.shared = 1  # how many chats the step ran with


class ComputeThread:
    """`run(fn, *args)` runs fn in the compute thread and returns its result (or raises its error) to the caller;
    a call made from the compute thread itself runs directly. `decode(model, token, cache, position)` is one
    decode step, batched with the other chats' steps (at most `batch_limit` a step)."""

    def __init__(self, batch_limit: int = 8):
        self.batch_limit = max(1, batch_limit)
        self._queue: deque = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._decoders = 0  # chats in their decode phase: each comes back with a step until it ends
        self.last_batch = 0  # how many chats shared the last decode step (the inspector shows it)
        self.steps: dict[int, list] = {}  # batch size → [decode steps, seconds] (eval's speed-up line)
        self.other_s = 0.0  # seconds of every other step (prefill chunks, vision views)

    def _start(self) -> None:
        with self._ready:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
                self._thread.start()

    def _submit(self, item) -> Future:
        if self._thread is None:
            self._start()
        with self._ready:
            self._queue.append(item)
            self._ready.notify_all()
        return item.future if isinstance(item, _Decode) else item[0]

    def run(self, fn, *args, **kwargs):
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self._submit((Future(), fn, args, kwargs)).result()

    def decode(self, model, token: int, cache, position: int, shared: list | None = None):
        """(logits, cache) of one decode step, run with the other decoding chats' steps; `shared` gets how many
        chats the step ran with."""
        if threading.current_thread() is self._thread:
            logits, caches = model.decode_batch([token], [cache], [position])
            result, count = (logits[0], caches[0]), 1
        else:
            step = _Decode(model, token, cache, position)
            result, count = self._submit(step).result(), step.shared
        if shared is not None:
            shared.append(count)
        return result

    @contextmanager
    def decoding(self):
        """Around a chat's decode phase: a batched step waits (GATHER_S at most) for the steps of chats inside."""
        with self._ready:
            self._decoders += 1
        try:
            yield
        finally:
            with self._ready:
                self._decoders -= 1
                self._ready.notify_all()

    def _loop(self) -> None:
        grad_off()
        slice_s = 0.0  # seconds of other steps since the last decode step
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                item = self._other() if 0 < slice_s < OTHER_SLICE_S else None
                item = item or self._queue.popleft()
                batch = self._gather(item) if isinstance(item, _Decode) else None
            started = time.perf_counter()
            if batch is None:
                future, fn, args, kwargs = item
                _settle(future, fn, *args, **kwargs)
                took = time.perf_counter() - started
                self.other_s += took
                slice_s += took
            else:
                slice_s = 0.0
                self._step(batch)
                record = self.steps.setdefault(len(batch), [0, 0.0])
                record[0] += 1
                record[1] += time.perf_counter() - started

    def _other(self):
        """The first queued step that is not a decode step, waiting FOLLOW_S at most for one (the request whose
        step just ran sends its next one as soon as it has the result); None if none came. Holds the lock."""
        deadline = time.monotonic() + FOLLOW_S
        while True:
            item = next((i for i in self._queue if not isinstance(i, _Decode)), None)
            left = deadline - time.monotonic()
            if item is not None or left <= 0:
                break
            self._ready.wait(left)
        if item is not None:
            self._queue.remove(item)
        return item

    def _gather(self, first: _Decode) -> list:
        """`first` and the queued decode steps of the same model, waiting up to GATHER_S for the steps of the other
        decoding chats (each sends its next step once it has sampled its last token). Holds the lock."""
        batch, deadline = [first], time.monotonic() + GATHER_S
        while len(batch) < self.batch_limit:
            for item in [i for i in self._queue if isinstance(i, _Decode) and i.model is first.model]:
                if len(batch) < self.batch_limit:
                    self._queue.remove(item)
                    batch.append(item)
            left = deadline - time.monotonic()
            if len(batch) >= min(self._decoders, self.batch_limit) or left <= 0:
                break
            self._ready.wait(left)
        return batch

    def _step(self, batch: list) -> None:
        self.last_batch = len(batch)
        try:
            logits, caches = batch[0].model.decode_batch([d.token for d in batch], [d.cache for d in batch],
                                                         [d.position for d in batch])
        except BaseException as err:  # every chat of the step gets the error
            for d in batch:
                d.future.set_exception(err)
            return
        for row, (d, cache) in enumerate(zip(batch, caches)):
            d.shared = len(batch)
            d.future.set_result((logits[row], cache))


def batching_summary(steps: dict[int, list], other_s: float) -> dict | None:
    """From ComputeThread.steps / other_s: how many chats shared a decode step on average, a step alone and at the
    usual batch size, and the estimated speed-up over one chat at a time (every batched step replaced by its rows'
    solo steps; prefill and vision are not batched, so they count the same). None without a solo step to compare."""
    if 1 not in steps or not steps[1][0]:
        return None
    solo = steps[1][1] / steps[1][0]
    count = sum(n for n, _ in steps.values())
    rows = sum(size * n for size, (n, _) in steps.items())
    busy = other_s + sum(s for _, s in steps.values())
    usual = max(steps, key=lambda size: steps[size][0] * size)  # the batch size most tokens were decoded at
    return {"mean_batch": rows / count, "solo_step_s": solo, "usual_batch": usual,
            "usual_step_s": steps[usual][1] / steps[usual][0],
            "speedup": (other_s + rows * solo) / busy if busy else 1.0}


def _settle(future: Future, fn, *args, **kwargs) -> None:
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as err:
        future.set_exception(err)

"""The one thread that runs the model: every model step of every request is handed to it and runs there.

Paddle keeps grad mode per thread: `paddle.set_grad_enabled(False)` in the thread that loaded the model leaves
autograd on in every other thread, so a server's worker threads would record history on each op and keep its
inputs alive. Handing the steps to one thread, configured once, makes the served path the command line's path;
steps of concurrent requests run one at a time in the order they were asked for.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from llava_ui.model.cpu import grad_off

THREAD_NAME = "llava-compute"


class ComputeThread:
    """`run(fn, *args)` runs fn in the compute thread and returns its result (or raises its error) to the caller.
    A call made from the compute thread itself runs directly."""

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _start(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME, initializer=self._setup)
            return self._executor

    def _setup(self) -> None:
        self._thread = threading.current_thread()
        grad_off()

    def run(self, fn, *args, **kwargs):
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return (self._executor or self._start()).submit(fn, *args, **kwargs).result()

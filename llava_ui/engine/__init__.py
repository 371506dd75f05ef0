"""The engine every local front end talks to, its parts side by side:

- plan.py       what a request needs before any compute: prompt ids, images to encode, prefix-cache items (Plan)
- steps.py      the steps as plain functions: prefill chunk by chunk, one decode step, the decode loop
- scheduler.py  the one thread that owns the model: runs every step, batches the chats' decode steps
- caches.py     image features and prompt prefixes' KV caches, bounded
- engine.py     Engine: load once, plan, stream tokens, stop on demand (the singleton: get_engine)

Below it, llava_ui.model: the options chosen once at load (options.py), the model (llava.py: vision tower,
projector and the language model's one layer loop in qwen2.py over the linear kernels), sampling.
"""
from llava_ui.engine.engine import Engine, get_engine

__all__ = ["Engine", "get_engine"]

"""Static programs run by Paddle Inference with oneDNN in bf16 (AMX or AVX-512 BF16 units: cpu.bf16_units).

Paddle's dynamic graph has no bf16 matmul on the CPU; Paddle Inference's oneDNN path has. A program here holds no
weights: every weight is an input, passed as the dynamic model's own fp32 tensor (no copy), and oneDNN's fc
converts it to bf16 once and keeps that copy. Its cache is keyed by the input's name and shape, not by its data,
so every weight has an input name of its own (unique over all programs) and the same tensor is passed every call;
and a copy is kept per input shape, so every program runs at one fixed shape (llava_ui.model.bf16).

Programs are exported once per (program, dimensions, Paddle version, shapes policy, the code that builds them)
into the cache folder beside the checkpoints; they depend on the checkpoint's dimensions, not on its weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import paddle

from llava_ui.config import app_home
from llava_ui.model.cpu import cpu_threads
from llava_ui.model.qwen2 import PREFILL_CHUNK

logger = logging.getLogger(__name__)

POLICY = f"one-view-{PREFILL_CHUNK}-rows-v3"  # the shapes policy: part of the export cache key


def programs_home() -> Path:
    """Exported programs live beside the checkpoint cache."""
    return app_home() / "programs"


class _Traced(paddle.nn.Layer):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, inputs):
        return self.fn(*inputs)


class Program:
    """One exported static program and its Paddle Inference predictor (oneDNN, bf16), called with its activations;
    its weights (the model's fp32 tensors) are passed after them on every call."""

    def __init__(self, name: str, fn, activations: list, weights: list, dims: dict):
        tag = name.replace("-", "_")
        specs = list(activations) + [_spec(t.shape, f"{tag}_w{i}") for i, t in enumerate(weights)]
        self.name, self.weights = name, list(weights)
        key = json.dumps({"program": name, "dims": dims, "paddle": paddle.__version__, "policy": POLICY,
                          "code": _CODE}, sort_keys=True)
        folder = programs_home() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        self.export_seconds = 0.0
        if not (folder / "program.json").exists():
            self.export_seconds = _export(fn, specs, key, folder)
            _drop_stale(name, folder, json.loads(key)["dims"])
        config = paddle.inference.Config(str(folder / "program.json"), "")
        config.enable_new_ir(True)
        config.enable_mkldnn()
        config.enable_mkldnn_bfloat16()
        config.set_cpu_math_library_num_threads(cpu_threads())
        config.disable_glog_info()
        self.predictor = paddle.inference.create_predictor(config)
        # the predictor takes its inputs in its own order: map them from the specs' order by name
        position = {spec.name: i for i, spec in enumerate(specs)}
        self.order = [position[name] for name in self.predictor.get_input_names()]

    def __call__(self, *activations) -> list:
        inputs = list(activations) + self.weights
        return self.predictor.run([inputs[i] for i in self.order])


def _drop_stale(name: str, current: Path, dims: dict) -> None:
    """Remove this program's exports for the same dimensions made by other code or Paddle versions (an upgrade
    would otherwise leave every earlier version's programs on disk); other checkpoints' dimensions stay."""
    for folder in current.parent.glob(f"{name}-*"):
        if folder == current or not folder.name[len(name) + 1:].isalnum():
            continue
        try:
            stale = json.loads((folder / "key.json").read_text())["dims"] == dims
        except (OSError, ValueError, KeyError):
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)


def _export(fn, specs: list, key: str, folder: Path) -> float:
    """Trace fn into folder/program.json (written beside, then moved: a reader never sees half a program)."""
    began = time.perf_counter()
    scratch = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    try:
        with warnings.catch_warnings():  # "no variable in your model": by design, the weights are inputs
            warnings.simplefilter("ignore", UserWarning)
            paddle.jit.save(_Traced(fn), str(scratch / "program"), input_spec=[specs])
        (scratch / "key.json").write_text(key)
        if not folder.exists():  # (another process may have exported it meanwhile)
            scratch.replace(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - began
    logger.debug("exported %s in %.1f s", folder, seconds)
    return seconds


# a program changes with the code that builds it
_CODE = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))).hexdigest()[:16]


def _spec(shape, name: str, dtype="float32"):
    return paddle.static.InputSpec(list(shape), dtype, name)



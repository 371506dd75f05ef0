"""The vision tower in bf16 on a CPU with bf16 units: one oneDNN program per SigLIP layer (the last one carries the
projector), one view at a time; the patch embedding stays fp32 (a small convolution). The language model's bf16
compute is the CPU kernels' (llava_ui.model.kernels, through Qwen2Runner's one layer loop): an engine computes in
bf16 on a CPU only where those build (model/options.py).

Threads: oneDNN keeps its bf16 weight copies per thread. Every call must come from the thread that prepared the
programs (the engine's compute thread, llava_ui.engine.scheduler): another thread would convert every weight
again (and hold a second copy), or, once the fp32 matrices are given back, convert their zeroed pages; the runner
refuses such a call (Bf16Vision.check_thread).

Memory: oneDNN keeps a bf16 copy of every program weight it multiplies by (fc), so the vision tower's and the
projector's fp32 matrices are read once, by the warm-up, and never again; the engine gives their pages back
(use_bf16(release_fp32=True), each layer right after its conversion).
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time

import numpy as np
import paddle
import paddle.nn.functional as F

from llava_ui.errors import check_stop
from llava_ui.model.cpu import drop_pages, release_free_memory
from llava_ui.model.onednn import Program, _spec

logger = logging.getLogger(__name__)

def _layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def dims_of(model) -> dict:
    """What a program's shape depends on: its export cache key."""
    text = model.config.text
    return {"text": {k: text.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "rms_norm_eps")},
            "vision": dict(model.config.vision.__dict__), "mm_hidden_size": model.config.mm_hidden_size}


def vision_layer_program(model, i: int, dims: dict) -> Program:
    """SigLIP layer i over one view [1, patches, hidden]; the last layer also runs the projector."""
    cfg = model.config.vision
    heads, eps, tanh = cfg.num_attention_heads, cfg.layer_norm_eps, cfg.hidden_act == "gelu_pytorch_tanh"
    layer = model.vision_tower.vision_model.encoder.layers[i]
    attn, mlp = layer.self_attn, layer.mlp
    weights = [layer.layer_norm1.weight, layer.layer_norm1.bias]
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
        weights += [proj.weight, proj.bias]
    weights += [layer.layer_norm2.weight, layer.layer_norm2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                mlp.fc2.bias]
    last = i == cfg.num_hidden_layers - 1
    if last:
        first, second = model.mm_projector[0], model.mm_projector[2]
        weights += [first.weight, first.bias, second.weight, second.bias]
    hidden, dim = cfg.hidden_size, cfg.hidden_size // heads

    def forward(x, ln1w, ln1b, qw, qb, kw, kb, vw, vb, ow, ob, ln2w, ln2b, f1w, f1b, f2w, f2b, *projector):
        h = _layer_norm(x, ln1w, ln1b, eps)
        q, k, v = (F.linear(h, w, b).reshape([0, -1, heads, dim]).transpose([0, 2, 1, 3])
                   for w, b in ((qw, qb), (kw, kb), (vw, vb)))
        scores = paddle.matmul(q * dim ** -0.5, k, transpose_y=True)
        attended = paddle.matmul(F.softmax(scores, axis=-1), v).transpose([0, 2, 1, 3]).reshape([0, -1, hidden])
        x = x + F.linear(attended, ow, ob)
        x = x + F.linear(F.gelu(F.linear(_layer_norm(x, ln2w, ln2b, eps), f1w, f1b), approximate=tanh), f2w, f2b)
        if projector:
            p1w, p1b, p2w, p2b = projector
            x = F.linear(F.gelu(F.linear(x, p1w, p1b)), p2w, p2b)  # exact erf GELU, as trained
        return x

    return Program(f"vision{i}", forward, [_spec([1, cfg.num_patches, hidden], f"vision{i}_x")], weights, dims)


class Bf16Vision:
    """`encode(pixels)` stands in for LlavaQwen.encode_views, with the same contract, through the vision programs."""

    def __init__(self, model, progress=None, release_fp32: bool = False):
        progress = progress or (lambda message: None)
        self.model = model
        self.thread = threading.get_ident()  # the one thread that may call the programs (check_thread)
        began = time.perf_counter()
        progress("preparing the bf16 vision programs ...")
        dims = dims_of(model)
        self.vision = [vision_layer_program(model, i, dims) for i in range(model.config.vision.num_hidden_layers)]
        self.export_seconds = sum(p.export_seconds for p in self.vision)
        progress("converting the vision weights to bf16 (each program's first run) ...")
        self.released = 0  # bytes of fp32 vision matrices given back (_run_vision)
        self._warm_up(release_fp32)
        release_free_memory()
        self.prepare_seconds = time.perf_counter() - began

    def _warm_up(self, release: bool) -> None:
        """Run every program once, so oneDNN converts the weights at load rather than in the first request; with
        `release`, each vision layer's fp32 matrices are given back right after its conversion (the load's peak
        then holds one layer in both precisions, not the whole tower)."""
        cfg = self.model.config.vision
        x = self.model.vision_tower.vision_model.embeddings(
            paddle.zeros([1, cfg.num_channels, cfg.image_size, cfg.image_size]))
        if release:
            # a process's first pass through the programs does not always leave oneDNN holding their bf16 weights
            # for the passes after it (those then read the released pages: wrong features; running each program
            # twice in one pass does not help), so the weights are given back during a second pass
            self._run_vision(x, False)
        self._run_vision(x, release)

    def release_fp32_vision(self) -> int:
        """Give the pages of the vision tower's and the projector's fp32 matrices back to the OS once oneDNN holds
        their bf16 copies (what use_bf16(release_fp32=True) does during the warm-up); returns the bytes released."""
        cfg = self.model.config.vision
        self._run_vision(paddle.to_tensor(np.random.default_rng(0).standard_normal(
            (1, cfg.num_patches, cfg.hidden_size)).astype("float32")), True)
        release_free_memory()
        return self.released

    def _run_vision(self, x, release: bool) -> None:
        """The vision programs over x [1, patches, hidden]; with `release`, each program's fp32 matrices are given
        back after its run (cpu.drop_pages: the buffers keep their addresses, which oneDNN files its bf16 copies
        under; the 1-D weights are read on every call and stay). The first layer is checked: run again, its output
        must not change, else (a Paddle whose fc re-read its weights) its matrices are restored and nothing more is
        released."""
        for i, program in enumerate(self.vision):
            out = program(x)[0]
            if release:
                matrices = [w for w in program.weights if w.ndim == 2]
                saved = [np.array(w.numpy(), copy=True) for w in matrices] if i == 0 else None
                released = sum(drop_pages(w) for w in matrices)
                if released and i == 0 and not np.array_equal(program(x)[0].numpy(), out.numpy()):
                    for w, values in zip(matrices, saved):
                        ctypes.memmove(w.data_ptr(), values.ctypes.data, values.nbytes)
                    logger.warning("kept the fp32 vision weights: this Paddle's oneDNN fc reads its weights on "
                                   "every call")
                    released = 0
                self.released += released
                release = released > 0  # (0: no madvise here, or the check failed)
            x = out
        if release:
            self.model.fp32_vision = False

    def check_thread(self) -> None:
        if threading.get_ident() != self.thread:
            raise RuntimeError("the bf16 programs run on the thread that prepared them (oneDNN keeps its bf16 weight "
                               "copies per thread): call the model through the engine's compute thread")

    def encode(self, pixels, should_stop=None) -> paddle.Tensor:
        """[N, 3, S, S] → [N, patches, hidden] projected features, one view at a time."""
        self.check_thread()
        views = []
        for view in paddle.split(pixels, pixels.shape[0]):
            x = self.model.vision_tower.vision_model.embeddings(view)
            for program in self.vision:
                check_stop(should_stop)  # one view is about a second of work: a stop lands within a layer
                x = program(x)[0]
            views.append(x)
        return views[0] if len(views) == 1 else paddle.concat(views)

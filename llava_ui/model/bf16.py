"""The model's bf16 compute on a CPU with bf16 units.

- language model: its weights packed once in bf16 for the bf16 linear kernel (llava_ui.model.kernels, through
  Qwen2Runner's one layer loop: prefill chunks, decode steps and the head all read bf16 weights). Where that
  kernel cannot be built, per layer two oneDNN programs here, the dense halves around attention: q|k|v, and o_proj
  + residual + post-attention norm + MLP + the next norm, at CHUNK rows (prefill chunks, the last one padded),
  while decode steps and short prompts stay on the fp32 weights (oneDNN's fc programs at one row convert their
  weights again whenever the shapes of a program's inputs change).
- vision: one program per SigLIP layer (the last one carries the projector), one view at a time; the patch
  embedding stays fp32 (a small convolution).
Attention, RoPE and the KV cache are Qwen2Runner's own (fp32, per CPU worker).
A stop request is honoured between two layers, as in the fp32 code.

Threads: oneDNN keeps those bf16 weight copies per thread. Every call must come from the thread that prepared the
programs (the engine's compute thread, llava_ui.backends.compute): another thread would convert every weight
again (and hold a second copy), or, once the fp32 matrices are given back, convert their zeroed pages; the runner
refuses such a call (Bf16Runner.check_thread).

Memory: oneDNN keeps a bf16 copy of every program weight it multiplies by (fc), so the vision tower's and the
projector's fp32 matrices are read once, by the warm-up, and never again; the engine gives their pages back
(use_bf16(release_fp32=True), each layer right after its conversion). With the bf16 linear kernel the language
model holds no fp32 matrix at all; without it, its fp32 matrices stay: decode and short prompts run on them.
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
from llava_ui.model.cpu import drop_pages, release_free_memory, run_parts
from llava_ui.model.onednn import Program, _spec
from llava_ui.model.qwen2 import PREFILL_CHUNK, _Step, _total, rms_norm

logger = logging.getLogger(__name__)

CHUNK = PREFILL_CHUNK  # rows of a prefill program
MIN_ROWS = 32  # a prompt part shorter than this (a short follow-up) stays fp32 rather than pad to CHUNK rows


def _zeros_for(weight):
    """The bias an unbiased matmul gets: matmul + bias becomes oneDNN's fc, which keeps its bf16 weights (a plain
    matmul converts its fp32 weight on every call; a bias shared by several matmuls does not fuse)."""
    return paddle.zeros([weight.shape[1]])


def _layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _rms_norm(x, weight, eps):
    # a sum times 1/n rather than mean: oneDNN's reduce_mean check prints a line per op to stdout
    return x * paddle.rsqrt((x * x).sum(axis=-1, keepdim=True) * (1.0 / x.shape[-1]) + eps) * weight


def dims_of(model, language: bool = True) -> dict:
    """What a program's shape depends on (its export cache key); the language model's programs also depend on how
    its layers are split into the workers' parts (`language`)."""
    text = model.config.text
    dims = {"text": {k: text.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "rms_norm_eps")},
            "vision": dict(model.config.vision.__dict__), "mm_hidden_size": model.config.mm_hidden_size}
    if language:
        dims["parts"] = [[p.q_heads for p in model.runner.parts[0][0]],
                         [p.gate_up.shape[1] for p in model.runner.parts[0][1]]]
    return dims


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


def layer_programs(runner, i: int, rows: int, dims: dict) -> tuple[Program, Program]:
    """Language-model layer i's dense halves at `rows` rows: qkv (h) → each attention part's q|k|v;
    rest (each part's heads, residual) → (the next layer's normed input, the new residual)."""
    layers = runner.qwen2.layers
    attention, feed = runner.parts[i]
    eps, hidden = runner.eps, runner.qwen2.norm.weight.shape[0]
    following = layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else runner.qwen2.norm.weight
    qkv_weights = [t for part in attention for t in (part.qkv, part.bias if part.bias is not None
                                                     else _zeros_for(part.qkv))]

    def qkv_forward(h, *w):
        return [F.linear(h, w[2 * p], w[2 * p + 1]) for p in range(len(attention))]

    tag = f"layer{i}x{rows}"
    qkv = Program(f"{tag}-qkv", qkv_forward, [_spec([rows, hidden], f"{tag}_h")], qkv_weights, dims)

    weights = [t for part in attention for t in (part.o_rows, _zeros_for(part.o_rows))]
    weights += [t for part in feed for t in (part.gate_up, _zeros_for(part.gate_up), part.down_rows,
                                             _zeros_for(part.down_rows))]
    weights += [layers[i].post_attention_layernorm.weight, following]
    parts, widths = len(attention), [part.down_rows.shape[0] for part in feed]

    def rest_forward(*inputs):
        heads, residual, w = inputs[:parts], inputs[parts], inputs[parts + 1:]
        x = residual + _total([F.linear(heads[p], w[2 * p], w[2 * p + 1]) for p in range(parts)])
        h = _rms_norm(x, w[-2], eps)
        mlp, fed = w[2 * parts:-2], []
        for j, width in enumerate(widths):
            gate_up = F.linear(h, mlp[4 * j], mlp[4 * j + 1])
            # silu(gate) * up in oneDNN ops (Paddle's swiglu has no oneDNN kernel: it would leave bf16)
            fed.append(F.linear(F.silu(gate_up[:, :width]) * gate_up[:, width:], mlp[4 * j + 2], mlp[4 * j + 3]))
        x = x + _total(fed)
        return _rms_norm(x, w[-1], eps), x

    specs = [_spec([rows, part.o_rows.shape[0]], f"{tag}_heads{p}") for p, part in enumerate(attention)]
    rest = Program(f"{tag}-rest", rest_forward, specs + [_spec([rows, hidden], f"{tag}_residual")], weights, dims)
    return qkv, rest


class Bf16Runner:
    """`encode(pixels)` stands in for LlavaQwen.encode_views and `forward(embeds, cache, start)` for
    Qwen2Runner.forward, with the same contracts; `takes(length)` says which forwards it runs."""

    def __init__(self, model, progress=None, release_fp32: bool = False, language: bool = True):
        progress = progress or (lambda message: None)
        runner = model.runner
        if language and runner.parts is None:
            runner.pack()
        if language and any(part.transposed or part.packed for part in runner.parts[0][0] + runner.parts[0][1]):
            raise ValueError("the bf16 programs take the language model's weights as stored (weight layout in-out)")
        self.model, self.runner = model, runner
        self.thread = threading.get_ident()  # the one thread that may call the programs (check_thread)
        began = time.perf_counter()
        progress("preparing the bf16 programs ...")
        vision_dims = dims_of(model, language=False)
        self.vision = [vision_layer_program(model, i, vision_dims)
                       for i in range(model.config.vision.num_hidden_layers)]
        count = len(runner.qwen2.layers)
        # (language False: the language model runs on the CPU kernels of its own, kernels.Bf16Matrix / Int8Matrix)
        self.layers = [layer_programs(runner, i, CHUNK, dims_of(model)) for i in range(count)] if language else []
        programs = self.vision + [p for pair in self.layers for p in pair]
        self.export_seconds = sum(p.export_seconds for p in programs)
        progress("converting the weights to bf16 (each program's first run) ...")
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
        if self.layers:
            hidden = self.runner.qwen2.norm.weight.shape[0]
            self.forward(paddle.zeros([1, CHUNK, hidden]), None, 0)

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

    def takes(self, length: int) -> bool:
        return bool(self.layers) and MIN_ROWS <= length <= CHUNK

    def forward(self, embeds, cache, start: int, should_stop=None):
        """embeds [1, L, hidden] at positions start.. (MIN_ROWS ≤ L ≤ CHUNK) → (normed hidden [1, L, hidden],
        cache)."""
        self.check_thread()
        runner, length, rows = self.runner, embeds.shape[1], CHUNK
        cache = runner.reserve(cache, start + length, embeds.dtype)
        step = _Step(runner, cache, start, length, embeds.dtype, False)
        h, residual = rms_norm(embeds[0], runner.qwen2.layers[0].input_layernorm.weight, runner.eps)
        h, residual = _pad(h, rows), _pad(residual, rows)
        for i, ((qkv, rest), (attention, _)) in enumerate(zip(self.layers, runner.parts)):
            check_stop(should_stop)
            projected = qkv(h)
            heads = run_parts(lambda p: step.attend(attention[p], projected[p][:length], i),
                              list(range(len(attention))))
            h, residual = rest(*[_pad(out, rows) for out in heads], residual)
        cache.length = start + length
        cache.mask = None  # rebuilt from the length by the next decode step
        return h[:length].unsqueeze(0), cache


def _pad(rows, count: int):
    """[L, n] → [count, n] with zero rows after the last (a program runs at one row count)."""
    extra = count - rows.shape[0]
    return rows if extra == 0 else paddle.concat([rows, paddle.zeros([extra, rows.shape[1]], rows.dtype)])

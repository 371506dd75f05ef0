"""The linear kernel interface of the language model's one layer loop: a CPU worker's share of a layer (its
attention heads' q|k|v and o_proj weights, its slice of the MLP) and `project`, which multiplies rows by such a
weight in whichever form the load chose for it, once (model/options.py): fp32 stored [in, out] or [out, in],
packed for MKL's sgemm (packed.py), or held by the CPU kernels in bf16 or int8 (kernels.py)."""
from __future__ import annotations

import paddle
import paddle.nn.functional as F

from llava_ui.model.kernels import Bf16Matrix, Int8Matrix, KernelMatrix
from llava_ui.model.packed import PackedMatrix


class _Part:
    """A worker's share of a layer: its weights (attributes named in WEIGHTS) stored [in, out], [out, in] once
    transposed, or packed for MKL (project() multiplies any)."""

    WEIGHTS: tuple = ()
    transposed = False
    packed = False

    def transpose(self) -> None:
        """Every weight to the other layout (each a new contiguous copy)."""
        for name in self.WEIGHTS:
            setattr(self, name, paddle.transpose(getattr(self, name), [1, 0]).contiguous())
        self.transposed = not self.transposed

    def pack_for_mkl(self) -> None:
        """Every [in, out] weight to MKL's packed layout (packed.PackedMatrix; the matrix itself is let go)."""
        for name in self.WEIGHTS:
            setattr(self, name, PackedMatrix(getattr(self, name)))
        self.packed = True

    def pack_for_kernels(self, matrix: type) -> None:
        """Every [in, out] weight to a kernel's format (kernels.Bf16Matrix or Int8Matrix; the fp32 matrix is let
        go)."""
        for name in self.WEIGHTS:
            setattr(self, name, matrix(getattr(self, name)))
        self.packed = True


class AttentionPart(_Part):
    """One worker's share of a layer's attention: kv heads `kv` (and their query heads), with q|k|v weights for
    just those heads side by side ([hidden, (q + 2 kv) heads * dim], one matmul) and the o_proj rows they feed."""

    WEIGHTS = ("qkv", "o_rows")

    def __init__(self, kv: range, group: int, dim: int, attn):
        self.kv, self.q_heads, self.kv_heads = kv, len(kv) * group, len(kv)
        q_cols = slice(kv.start * group * dim, kv.stop * group * dim)
        kv_cols = slice(kv.start * dim, kv.stop * dim)
        self.qkv = paddle.concat([attn.q_proj.weight[:, q_cols], attn.k_proj.weight[:, kv_cols],
                                  attn.v_proj.weight[:, kv_cols]], axis=1)
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        self.bias = None if biases[0] is None else paddle.concat(
            [biases[0][q_cols], biases[1][kv_cols], biases[2][kv_cols]])
        self.o_rows = attn.o_proj.weight[q_cols]  # a view: rows of a matrix are contiguous


class MLPPart(_Part):
    """One worker's share of the SwiGLU intermediate: gate|up columns side by side, and the down_proj rows."""

    WEIGHTS = ("gate_up", "down_rows")

    def __init__(self, cols: range, mlp):
        share = slice(cols.start, cols.stop)
        self.gate_up = paddle.concat([mlp.gate_proj.weight[:, share], mlp.up_proj.weight[:, share]], axis=1)
        self.down_rows = mlp.down_proj.weight[share]


def project(x, weight, transposed: bool, bias=None):
    """x [rows, in] times a part's weight, stored [in, out], (transposed) [out, in] or packed for MKL; + bias.

    The layouts suit different work (MKL on one thread per worker, weights read from memory): one row is a
    matrix-vector product, slightly faster over [in, out]; a few rows (a batched decode step) are a small matrix
    product, which MKL's sgemm computes far more slowly over an [in, out] weight than as an [out, in] weight times
    the rows' transpose (bench/batch_steps.py measures both). Packed for MKL (packed.py), a few rows cost about one
    row; the kernels' matrices (oneDNN's packed bf16, int8) read their weight once whatever the row count."""
    if isinstance(weight, KernelMatrix):
        return weight.matmul(x, bias)
    if isinstance(weight, PackedMatrix):
        out = weight.matmul(x)
        return out if bias is None else out + bias
    if not transposed:
        return F.linear(x, weight, bias)
    if SKINNY_ROWS[0] <= x.shape[0] <= SKINNY_ROWS[1]:
        out = paddle.transpose(paddle.matmul(weight, x, transpose_y=True), [1, 0])
    else:
        out = paddle.matmul(x, weight, transpose_y=True)
    return out if bias is None else out + bias


SKINNY_ROWS = (3, 16)  # row counts computed as weight · xᵀ
WEIGHT_LAYOUTS = ("in-out", "out-in", "packed", "bf16", "int8")
KERNEL_LAYOUTS = {"bf16": Bf16Matrix, "int8": Int8Matrix}  # the layouts the CPU kernels multiply by (kernels.py)


def mlp(part: MLPPart, x):
    """A part's share of the SwiGLU MLP: its down_proj product [L, hidden] (the MLP's output is the sum over
    parts)."""
    return project(F.swiglu(project(x, part.gate_up, part.transposed)), part.down_rows, part.transposed)

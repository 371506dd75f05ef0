"""The bf16 linear kernel (llava_ui.model.kernels): products of bf16-rounded values summed in fp32, each row its
own whatever rides with it, the same from several threads at once, weights packed once."""
import threading

import numpy as np
import paddle
import pytest

from cpu_kinds import needs_bf16_units
from llava_ui.model import kernels

pytestmark = [needs_bf16_units,
              pytest.mark.skipif(not kernels.available(), reason="the bf16 linear kernel cannot be built here")]


def bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 (ties to even), back in float64."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("k, n", [(64, 96), (150, 64), (1024, 3072), (2816, 1024)])
def test_products_are_bf16_values_summed_in_fp32(k, n):
    rng = np.random.default_rng(k + n)
    weight, x = rng.standard_normal((k, n)).astype(np.float32), rng.standard_normal((9, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    out = kernels.Bf16Matrix(paddle.to_tensor(weight)).matmul(paddle.to_tensor(x), paddle.to_tensor(bias)).numpy()
    exact = bf16(x) @ bf16(weight) + bias  # the same rounded inputs, summed in float64
    scale = np.abs(bf16(x)) @ np.abs(bf16(weight))
    assert np.all(np.abs(out - exact) <= 1e-5 * scale + 1e-5)
    assert np.abs(out - (x @ weight + bias)).max() > 0  # (the inputs were rounded: not an fp32 product)


def test_a_tied_head_packs_from_its_stored_transpose():
    rng = np.random.default_rng(1)
    embedding, x = rng.standard_normal((500, 64)).astype(np.float32), rng.standard_normal((3, 64)).astype(np.float32)
    tied = kernels.Bf16Matrix(paddle.to_tensor(embedding), transposed=True)
    plain = kernels.Bf16Matrix(paddle.to_tensor(np.ascontiguousarray(embedding.T)))
    assert tied.shape == plain.shape == [64, 500]
    assert np.array_equal(tied.packed.numpy(), plain.packed.numpy())
    assert np.array_equal(tied.matmul(paddle.to_tensor(x)).numpy(), plain.matmul(paddle.to_tensor(x)).numpy())


@pytest.mark.parametrize("k, n", [(64, 176), (1024, 5632)])
def test_each_row_gets_what_it_gets_alone_in_any_batch(k, n):
    """A batched decode step's rows (2-8 chats) and a prefill chunk's rows equal the same rows alone."""
    rng = np.random.default_rng(2)
    matrix = kernels.Bf16Matrix(paddle.to_tensor(rng.standard_normal((k, n)).astype(np.float32)))
    x = rng.standard_normal((256, k)).astype(np.float32)
    whole = matrix.matmul(paddle.to_tensor(x)).numpy()
    for rows in (2, 3, 4, 8, 33):
        assert np.array_equal(matrix.matmul(paddle.to_tensor(x[5:5 + rows])).numpy(), whole[5:5 + rows])


def test_threads_running_the_same_shape_at_once_get_their_own_results():
    """The CPU workers' parts of a layer have equal shapes and run at once: each gets its own product."""
    rng = np.random.default_rng(3)
    matrices = [kernels.Bf16Matrix(paddle.to_tensor(rng.standard_normal((512, 704)).astype(np.float32)))
                for _ in range(2)]
    inputs = [paddle.to_tensor(rng.standard_normal((4, 512)).astype(np.float32)) for _ in range(2)]
    expected = [m.matmul(x).numpy() for m, x in zip(matrices, inputs)]
    wrong = []

    def work(i):
        for _ in range(200):
            if not np.array_equal(matrices[i].matmul(inputs[i]).numpy(), expected[i]):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong


def test_a_strided_view_is_read_as_its_values():
    rng = np.random.default_rng(4)
    matrix = kernels.Bf16Matrix(paddle.to_tensor(rng.standard_normal((64, 32)).astype(np.float32)))
    x = paddle.to_tensor(rng.standard_normal((64, 5)).astype(np.float32))
    view = paddle.transpose(x, [1, 0])  # [5, 64], not contiguous
    assert np.array_equal(matrix.matmul(view).numpy(), matrix.matmul(view.contiguous()).numpy())

"""The bf16 linear kernel (llava_ui.model.kernels): products of bf16-rounded values summed in fp32, each row its
own whatever rides with it, the same from several threads at once, weights packed once."""
import threading

import numpy as np
import paddle
import pytest

from cpu_kinds import needs_bf16_units
from llava_ui.model import kernels

pytestmark = needs_bf16_units


@pytest.fixture(autouse=True)
def _kernel_built():
    if not kernels.available():
        pytest.skip("the bf16 linear kernel cannot be built here")


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


def test_attention_kernels_over_a_bf16_cache_compute_what_the_paddle_ops_do_over_fp32(checkpoints, monkeypatch):
    """A bf16 model with prefill and decode attention in kernel calls over a bf16 KV cache gives, within bf16's
    rounding, the logits and cache rows of the same steps as Paddle ops over an fp32 cache, for one chat alone and
    for a batched step of three."""
    from llava_ui.checkpoints.load import build_model
    from llava_ui.engine.steps import decode_one_token, prefill

    model = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None, "bf16")[0]
    model.runner.whole_step = False  # the layer loop, whose kernel calls are counted (the whole step: below)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 200, n).tolist() for n in (37, 300, 5)]
    runs, calls = {}, []
    counted, counted_rows = kernels.decode_attention, kernels.decode_attention_rows
    monkeypatch.setattr(kernels, "decode_attention", lambda *args: calls.append(1) or counted(*args))
    monkeypatch.setattr(kernels, "decode_attention_rows",  # a batched step's rows: one call per part and layer
                        lambda *args: calls.extend([1] * len(args[3])) or counted_rows(*args))
    for kernel in (True, False):
        model.runner.attention_kernel = kernel
        caches, logits = [], []
        for ids in prompts:
            _, cache = prefill(model, model.embed_prompt(ids, []), room=8)
            caches.append(cache)
        assert caches[0].keys[0].dtype == (paddle.bfloat16 if kernel else paddle.float32)
        positions = [len(ids) for ids in prompts]
        for i in range(3):  # one chat alone
            step_logits, caches[i] = decode_one_token(model, 7, caches[i], positions[i])
            logits.append(step_logits.numpy().reshape(-1))
        for step in range(1, 4):  # the three in batched steps
            step_logits, caches = model.decode_batch([7 + step] * 3, caches, [p + step for p in positions])
            logits.extend(step_logits.numpy())
        runs[kernel] = (np.stack(logits), [c.keys[1].astype("float32").numpy() for c in caches],
                        [c.values[0].astype("float32").numpy() for c in caches])
    model.runner.attention_kernel = True
    layers, parts = len(model.runner.parts), len(model.runner.parts[0][0])
    assert len(calls) == (3 + 3 * 3) * layers * parts  # every decode row of every part of every layer, kernel only
    (a, keys_a, values_a), (b, keys_b, values_b) = runs[True], runs[False]
    assert np.abs(a - b).max() <= 0.02 * np.abs(b).max()
    for x, y in zip(keys_a + values_a, keys_b + values_b):
        assert np.abs(x - y).max() <= 0.02 * np.abs(y).max()  # (layer 1: after layer 0 in bf16)


@pytest.mark.parametrize("start, rows, q_heads, kv_heads", [(0, 700, 2, 2), (300, 37, 4, 2), (1000, 600, 2, 1)])
def test_prefill_attention_is_causal_softmax_attention(start, rows, q_heads, kv_heads):
    """A prefill chunk at positions start.. writes its keys and values into the bf16 cache after the cached prefix
    and gives each row softmax attention over positions 0..its own (blocks of queries and keys, across block
    edges, a later chunk over a cached prefix, grouped kv heads), within bf16's rounding of q and the weights."""
    rng = np.random.default_rng(start + rows)
    dim, capacity = 64, start + rows + 40
    heads = rng.standard_normal((q_heads + 2 * kv_heads, rows, dim)).astype(np.float32)
    heads[:q_heads] *= 0.3
    prefix_keys = bf16(rng.standard_normal((kv_heads, capacity, dim)).astype(np.float32)).astype(np.float32)
    prefix_values = bf16(rng.standard_normal((kv_heads, capacity, dim)).astype(np.float32)).astype(np.float32)
    keys = paddle.to_tensor(prefix_keys.reshape(-1, dim)).astype("bfloat16")
    values = paddle.to_tensor(prefix_values.reshape(-1, dim)).astype("bfloat16")
    out = kernels.prefill_attention(paddle.to_tensor(heads), keys, values, kv_heads, capacity, start).numpy()
    assert out.shape == (rows, q_heads * dim)
    stored_keys = keys.astype("float32").numpy().reshape(kv_heads, capacity, dim)
    stored_values = values.astype("float32").numpy().reshape(kv_heads, capacity, dim)
    group = q_heads // kv_heads
    for kv in range(kv_heads):
        assert np.array_equal(stored_keys[kv, :start], prefix_keys[kv, :start])  # the prefix as it was
        assert np.array_equal(stored_keys[kv, start:start + rows], bf16(heads[q_heads + kv]))
        assert np.array_equal(stored_values[kv, start:start + rows], bf16(heads[q_heads + kv_heads + kv]))
    for h in range(q_heads):
        k = stored_keys[h // group, :start + rows].astype(np.float64)
        v = stored_values[h // group, :start + rows].astype(np.float64)
        scores = heads[h].astype(np.float64) @ k.T
        visible = np.arange(start + rows)[None, :] <= np.arange(start, start + rows)[:, None]
        scores = np.where(visible, scores, -np.inf)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        expected = (weights / weights.sum(axis=1, keepdims=True)) @ v
        assert np.abs(out[:, h * dim:(h + 1) * dim] - expected).max() < 0.03 * np.abs(expected).max()


CONCURRENT_FIRST_USE = """
import sys, threading
from llava_ui.model import kernels
builds, barrier = [], threading.Barrier(4)
build = kernels._build
kernels._build = lambda: builds.append(1) or build()
def first():
    barrier.wait()
    kernels.available()
threads = [threading.Thread(target=first) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print("BUILDS", len(builds), flush=True)
print("stderr still writes", file=sys.stderr, flush=True)
"""


def test_threads_asking_for_the_kernel_first_at_once_build_it_once():
    """Two engines loading at once (a server's engine and another) ask for the kernel together: it is built and
    loaded once, and the process's stdout and stderr still write afterwards."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CONCURRENT_FIRST_USE], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "BUILDS 1" in done.stdout
    assert "stderr still writes" in done.stderr


NO_REORDER = """
import sys
import paddle
from llava_ui.checkpoints.load import build_model
from llava_ui.engine.steps import decode_one_token, prefill

model = build_model(sys.argv[1], "float32", lambda *a, **k: None, "bf16")[0]
assert model.runner.layout == "bf16"
embeds = model.embed_tokens(paddle.to_tensor([[5, 6, 7, 8, 9, 10, 11, 12]]))
logits, cache = prefill(model, embeds, room=40)
position = embeds.shape[1]
for token in (3, 4, 5):  # warm-up: the one-row primitives made
    logits, cache = decode_one_token(model, token, cache, position)
    position += 1
print("STEADY STATE", flush=True)
for token in range(6, 30):
    logits, cache = decode_one_token(model, token, cache, position)
    position += 1
print("DONE", flush=True)
"""


def test_decode_steps_never_convert_a_weight_again(tiny_dir):
    """ONEDNN_VERBOSE=1 lists every primitive oneDNN runs: after the load packed the weights (reorders) and a
    warm-up step, decode steps run matmuls only, no reorder of any weight, whatever the row count or position."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    done = subprocess.run([sys.executable, "-c", NO_REORDER, str(tiny_dir)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    before, _, steady = done.stdout.partition("STEADY STATE")
    assert "DONE" in steady
    executed = [line for line in steady.splitlines() if line.startswith("onednn_verbose") and ",exec," in line]
    assert any(",reorder," in line for line in before.splitlines())  # verbose works: the load's packing shows
    assert sum(",matmul," in line for line in executed) >= 24 * 2  # 24 steps, each several products
    assert not [line for line in executed if ",reorder," in line]


def test_the_kernels_never_change_a_strided_input_the_workers_share():
    """The head's shares all read one hidden row, `hidden[:, -1]`, which Paddle keeps strided. Paddle's
    Tensor.contiguous() would swap that tensor's storage in place (the GIL let go): two workers doing it at once
    freed each other's storage, and long test runs died of heap corruption. The kernels read a contiguous copy
    and leave the shared tensor as it was; the products are the contiguous row's."""
    from llava_ui.model.cpu import run_parts

    rng = np.random.default_rng(5)
    hidden = paddle.to_tensor(rng.standard_normal((1, 7, 64)).astype(np.float32))
    row = hidden[:, -1]
    assert not row.is_contiguous()  # (what makes the case)
    address = row.data_ptr()
    shares = [kernels.Bf16Matrix(paddle.to_tensor(rng.standard_normal((64, 48)).astype(np.float32)))
              for _ in range(2)]
    expected = [share.matmul(paddle.to_tensor(row.numpy())).numpy() for share in shares]
    for _ in range(200):
        outs = run_parts(lambda share: share.matmul(row), shares)
        assert all(np.array_equal(out.numpy(), want) for out, want in zip(outs, expected))
    assert not row.is_contiguous() and row.data_ptr() == address
    weight = paddle.to_tensor(rng.standard_normal((48, 64)).astype(np.float32)).T  # a strided weight, packed
    address = weight.data_ptr()
    kernels.Bf16Matrix(weight)
    assert not weight.is_contiguous() and weight.data_ptr() == address


@pytest.mark.parametrize("k, n", [(64, 37), (896, 200), (896, 131), (40, 7), (2432, 896)])
def test_int8_weights_are_each_outputs_values_rounded_to_127_steps(k, n):
    """Per output: scale = largest magnitude / 127, values = round(weight / scale), so each weight is within half a
    step of its fp32 value and each output's largest reaches ±127."""
    rng = np.random.default_rng(k * n)
    weight = rng.normal(0, 0.02, (k, n)).astype(np.float32)
    matrix = kernels.Int8Matrix(paddle.to_tensor(weight))
    values, scales = matrix.values.numpy(), matrix.scales.numpy()
    assert values.shape == (n, k) and matrix.shape == [k, n] and matrix.nbytes == n * k + 4 * n
    assert np.allclose(scales, np.abs(weight).max(axis=0) / 127, rtol=1e-6)
    assert np.array_equal(np.abs(values).max(axis=1), np.full(n, 127))
    assert np.all(np.abs(matrix.dequantized().numpy() - weight) <= scales / 2 * (1 + 1e-5))
    tied = kernels.Int8Matrix(paddle.to_tensor(np.ascontiguousarray(weight.T)), transposed=True)  # stored [n, k]
    assert np.array_equal(tied.values.numpy(), values) and np.array_equal(tied.scales.numpy(), scales)


def int16_rows(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A decode step's rows as the int8 kernel rounds them: each row's largest magnitude to the largest int16 whose
    products with int8 weights cannot overflow an int32 sum over k (32767 for these sizes), to nearest even."""
    largest = min(32767.0, np.floor((2 ** 31 - 1) / (127.0 * 2.0 * -(-k // 32))))
    most = np.abs(x).max(axis=1)
    steps = np.where(most > 0, (most.astype(np.float64) / largest).astype(np.float32), np.float32(1))
    return np.rint(x / steps[:, None]).astype(np.int64), steps


@pytest.mark.parametrize("k, n", [(64, 37), (896, 131), (896, 300), (40, 7), (2432, 896)])
def test_int8_products_are_the_rounded_weights_times_the_rows(k, n):
    """Up to 8 rows (a decode step): each row rounded to int16 with its own scale, multiplied exactly (integer sums)
    by the int8 values, then times both scales, plus the bias: the same bits as that arithmetic done here, whether
    k is a multiple of 32 (the AVX-512 kernel) or not (the plain loop). More rows (a prefill chunk): oneDNN with
    the rows and weights in bf16, products summed in fp32 (bf16's precision). Outputs past a multiple of 4 and 64
    are covered."""
    rng = np.random.default_rng(k + n)
    weight = rng.normal(0, 0.02, (k, n)).astype(np.float32)
    matrix = kernels.Int8Matrix(paddle.to_tensor(weight))
    values, scales = matrix.values.numpy().astype(np.int64), matrix.scales.numpy()
    dequantized = matrix.dequantized().numpy().astype(np.float64)
    bias = rng.standard_normal(n).astype(np.float32)
    for rows in (1, 2, 3, 4, 5, 8, 9, 40):
        x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 10, (rows, 1))).astype(np.float32)
        out = matrix.matmul(paddle.to_tensor(x), paddle.to_tensor(bias)).numpy()
        if rows <= 8:
            rounded, steps = int16_rows(x, k)
            sums = (rounded @ values.T).astype(np.float64)
            expected = (sums * steps[:, None].astype(np.float64) * scales[None, :].astype(np.float64)).astype(
                np.float32) + bias
            assert np.array_equal(out, expected), rows
            # and that is the product with the dequantized weight, to within the rows' rounding (half a step each)
            error = steps[:, None] / 2 * np.abs(dequantized).sum(axis=0)[None, :]
            assert np.all(np.abs(out - (x @ dequantized + bias)) <= error * (1 + 1e-5) + 1e-5), rows
        else:
            scale = np.abs(x) @ np.abs(dequantized) + np.abs(bias)
            assert np.all(np.abs(out - (x @ dequantized + bias)) <= 2 ** -7 * scale), rows
    # a batched decode step's rows (up to 8 chats) each get exactly what they get alone
    x = rng.standard_normal((8, k)).astype(np.float32)
    whole = matrix.matmul(paddle.to_tensor(x)).numpy()
    for i in range(8):
        assert np.array_equal(matrix.matmul(paddle.to_tensor(x[i:i + 1])).numpy(), whole[i:i + 1])


@pytest.fixture(scope="module", params=["bf16", "int8"])
def kernel_model(tiny_dir, request):
    from llava_ui.checkpoints.load import build_model

    return build_model(str(tiny_dir), "float32", lambda *a, **k: None, request.param)[0]


def _caches(model, lengths):
    from llava_ui.engine.steps import prefill

    caches = []
    for i, length in enumerate(lengths):
        ids = np.random.default_rng(i).integers(1, 200, length).tolist()
        _, cache = prefill(model, model.embed_prompt(ids, []), room=3 + 40 * i)  # capacities differ too
        caches.append(cache)
    return caches


def _copy(cache):
    return type(cache)([k.clone() for k in cache.keys], [v.clone() for v in cache.values], cache.kv_heads,
                       cache.length)


def test_the_whole_decode_step_computes_what_the_layer_loop_does(kernel_model):
    """One call per worker for every layer and the LM head (kernels.DecodeProgram) against the step layer by layer
    over the same kernels (Qwen2Runner with whole_step off): the logits and the cache writes, at 1 and 3 rows of
    different lengths, to fp32's precision (the norms and SwiGLU are summed in another order)."""
    runner = kernel_model.runner
    for lengths in ([37], [20, 45, 9]):
        caches = _caches(kernel_model, lengths)
        tokens = kernel_model.embed_tokens(paddle.to_tensor([3 + i for i in range(len(lengths))]))
        results = {}
        for whole in (False, True):
            runner.whole_step = whole
            copies = [_copy(cache) for cache in caches]
            logits, written = runner.decode_batch(tokens, copies, list(lengths), head=kernel_model.logits)
            results[whole] = logits.numpy(), written
        runner.whole_step = True
        assert runner.decode_program(caches) is not None
        (loop, loop_caches), (whole, whole_caches) = results[False], results[True]
        assert whole.shape == loop.shape == (len(lengths), kernel_model.runner.embedding.shape[0])
        assert np.abs(whole - loop).max() <= 1e-5 * np.abs(loop).max()
        for a, b, length in zip(loop_caches, whole_caches, lengths):
            assert a.length == b.length == length + 1
            for x, y in zip(a.keys + a.values, b.keys + b.values):  # the new position's keys and values (bf16)
                x, y = x.astype("float32").numpy(), y.astype("float32").numpy()
                assert np.abs(x - y).max() <= 2 ** -7 * np.abs(x).max()


def test_a_worker_that_fails_stops_the_others_and_says_why(kernel_model):
    """The workers wait for each other twice a layer: one that fails lets the others go (no hang) and the error is
    its own reason, not 'another worker failed'."""
    runner = kernel_model.runner
    runner.whole_step = True
    caches = _caches(kernel_model, [12])
    program = runner.decode_program(caches)
    broken = program._parts[-1][program.layers - 1].down  # the last layer of the last worker
    kind, broken.kind = broken.kind, 9
    try:
        done = []
        thread = threading.Thread(target=lambda: done.append(_raised(lambda: kernel_model.decode_batch(
            [4], caches, [12]))))
        thread.start()
        thread.join(60)
        assert done and "unknown weight kind" in done[0]
    finally:
        broken.kind = kind
    logits, _ = kernel_model.decode_batch([4], caches, [12])  # works again
    assert np.isfinite(logits.numpy()).all()


def _raised(fn) -> str:
    try:
        fn()
    except RuntimeError as err:
        return str(err)
    return ""


def test_the_whole_step_runs_only_with_every_worker_at_once(kernel_model, monkeypatch):
    """Workers that run one after the other would wait for each other for ever: then the layer loop runs."""
    from llava_ui.model import qwen2

    caches = _caches(kernel_model, [10])
    assert kernel_model.runner.decode_program(caches) is not None
    monkeypatch.setattr(qwen2, "concurrent_workers", lambda: 1)
    assert kernel_model.runner.decode_program(caches) is None
    logits, _ = kernel_model.decode_batch([4], caches, [10])
    assert np.isfinite(logits.numpy()).all()


@pytest.mark.parametrize("flags", [("-mno-avx512vnni",), ("-mno-avx512f",)], ids=["without-vnni", "without-avx512"])
def test_the_int8_products_are_the_same_bits_on_every_code_path(flags):
    """The int8 kernel's decode products branch on the CPU: AVX-512 VNNI (vpdpwssd) here, AVX-512 without VNNI
    (madd + add), or no AVX-512 (the plain loop). The library built as for each of the others gives the same bits
    as this CPU's build: on every path the sums are exact integers."""
    other = kernels._build(flags)
    rng = np.random.default_rng(11)
    for k, n in [(896, 131), (64, 37), (40, 5)]:
        matrix = kernels.Int8Matrix(paddle.to_tensor(rng.normal(0, 0.02, (k, n)).astype(np.float32)))
        bias = paddle.to_tensor(rng.standard_normal(n).astype(np.float32))
        for rows in (1, 3, 8):
            x = paddle.to_tensor((rng.standard_normal((rows, k)) * 3).astype(np.float32))
            here = matrix.matmul(x, bias).numpy()
            there = paddle.empty([rows, n], "float32")
            assert other.llava_int8_linear(x.data_ptr(), rows, k, matrix.values.data_ptr(),
                                           matrix.scales.data_ptr(), bias.data_ptr(), n, there.data_ptr()) == 0
            assert np.array_equal(there.numpy(), here), (flags, k, n, rows)

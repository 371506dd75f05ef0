"""The GPU path, as far as a CPU can check it: weights loaded in bf16 / fp16, the device and precision policy
(Paddle's CUDA queries mocked), the fused attention call Paddle would run on a GPU, the fp16 overflow guard and
the weight layout a GPU keeps."""
import numpy as np
import paddle
import pytest

from llava_ui.checkpoints.load import build_model, convert_state, detect_layout
from llava_ui.checkpoints.weights import open_weights, weight_files
from llava_ui.config import read_config

LAYOUTS = ("paddlenlp", "lmms", "hf")


def _bf16_of(values: np.ndarray) -> np.ndarray:
    """float32 → bf16 → float32, to nearest with ties to even (computed in float64 here, not with bit tricks)."""
    values = values.astype(np.float64)
    exponent = np.floor(np.log2(np.maximum(np.abs(values), np.finfo(np.float32).tiny)))
    step = 2.0 ** (exponent - 7)  # bf16 keeps 8 significant bits
    return (np.round(values / step) * step).astype(np.float32)  # np.round: halves to even


def _as_float32(param) -> np.ndarray:
    return param.astype("float32").numpy()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_load_in_half_precision_rounded_from_the_checkpoint(checkpoints, layout, dtype):
    folder = checkpoints(layout, vocab="bytes")
    model, config, _ = build_model(folder, dtype, progress=lambda *a, **k: None)
    state = convert_state(open_weights(weight_files(folder)), detect_layout(folder),
                          read_config(folder, layout).text["tie_word_embeddings"])
    params = dict(model.named_parameters())
    assert len(params) > 20
    for name, param in params.items():
        assert param.dtype == getattr(paddle, dtype), name
        stored = np.asarray(state[name], dtype=np.float32)
        expected = _bf16_of(stored) if dtype == "bfloat16" else stored.astype(np.float16).astype(np.float32)
        assert np.array_equal(_as_float32(param), expected), name
    attention = model.runner.parts[0][0][0]  # the regrouped q|k|v weights keep the dtype too
    assert attention.qkv.dtype == getattr(paddle, dtype)


def test_bf16_rounding_is_to_nearest_with_ties_to_even():
    from llava_ui.checkpoints.load import rounded

    ties = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.0e-3, 65504.0, np.inf], np.float32)
    bits = rounded(ties, paddle.bfloat16)
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    assert bits.dtype == np.uint16
    assert np.array_equal(back[:3], np.array([1.0, 1 + 2 ** -6, -1.0], np.float32))
    assert np.array_equal(back[:-1], _bf16_of(ties[:-1])) and back[-1] == np.inf
    assert np.array_equal(bits, paddle.to_tensor(ties).astype("bfloat16").numpy())  # as Paddle's own cast rounds


class FakeGpus:
    """Paddle's CUDA queries answering for the given (name, compute capability) devices."""

    def __init__(self, monkeypatch, *devices, compiled: bool = True):
        self.devices, self.asked = devices, []
        monkeypatch.setattr(paddle.device, "is_compiled_with_cuda", lambda: compiled)
        monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: len(devices))
        monkeypatch.setattr(paddle.device.cuda, "get_device_capability", self.capability)
        monkeypatch.setattr(paddle.device.cuda, "get_device_name", lambda index: devices[index][0])
        # what Paddle's own checks read about the current device: the policy must not look there
        monkeypatch.setattr(paddle.amp, "is_bfloat16_supported", lambda *a: pytest.fail("asked the current GPU"))

    def capability(self, index):
        assert isinstance(index, int), index
        self.asked.append(index)
        return self.devices[index][1]


A10G, T4 = ("NVIDIA A10G", (8, 6)), ("Tesla T4", (7, 5))


def test_a_gpu_with_bf16_computes_in_bf16(monkeypatch):
    from llava_ui.model.device import choose

    FakeGpus(monkeypatch, A10G)
    policy = choose()
    assert (policy.device, policy.dtype, policy.weights_dtype, policy.precision) == (
        "gpu:0", "bfloat16", "bfloat16", "bf16")
    assert "NVIDIA A10G" in policy.reason and "8.6" in policy.reason


def test_a_gpu_without_bf16_computes_in_fp16_and_refuses_bf16(monkeypatch):
    from llava_ui.errors import UserError
    from llava_ui.model.device import choose

    FakeGpus(monkeypatch, T4)
    policy = choose()
    assert (policy.device, policy.dtype, policy.precision) == ("gpu:0", "float16", "fp16")
    assert "Tesla T4" in policy.reason and "no bf16" in policy.reason
    with pytest.raises(UserError, match=r"--dtype bfloat16 needs a GPU of compute capability 8\.0.*Tesla T4"
                                        r".*--dtype float16"):
        choose("gpu", "bfloat16")
    assert choose(dtype="float32").dtype == "float32"


def test_the_precision_is_checked_on_the_chosen_gpu(monkeypatch):
    from llava_ui.errors import UserError
    from llava_ui.model.device import choose

    gpus = FakeGpus(monkeypatch, T4, A10G)
    assert choose("gpu:1").dtype == "bfloat16" and gpus.asked and set(gpus.asked) == {1}
    assert choose("gpu:0").dtype == "float16"
    assert choose("gpu:1", "bfloat16").device == "gpu:1"
    with pytest.raises(UserError, match="Tesla T4"):
        choose("gpu:0", "bfloat16")
    with pytest.raises(UserError, match=r"has 2 GPUs \(gpu:0 to gpu:1\)"):
        choose("gpu:2")


@pytest.mark.parametrize("asked, chosen", [("cuda", "gpu:0"), ("cuda:1", "gpu:1"), ("gpu", "gpu:0"),
                                           ("GPU:1", "gpu:1"), ("cpu", "cpu")])
def test_cuda_names_are_gpu_names(monkeypatch, asked, chosen):
    from llava_ui.model.device import choose

    FakeGpus(monkeypatch, A10G, T4)
    assert choose(asked, "float32").device == chosen


def test_unknown_devices_and_missing_gpus_are_refused(monkeypatch):
    from llava_ui.errors import UserError
    from llava_ui.model.device import choose

    FakeGpus(monkeypatch, A10G)
    with pytest.raises(UserError, match="use cpu, gpu or gpu:N"):
        choose("tpu")
    FakeGpus(monkeypatch, compiled=False)
    with pytest.raises(UserError, match="no GPU found.*built without CUDA.*--device cpu"):
        choose("cuda")
    FakeGpus(monkeypatch)
    with pytest.raises(UserError, match="no GPU found.*sees no device"):
        choose("gpu:0")


def test_without_a_gpu_the_cpu_precision_follows_its_bf16_units(monkeypatch):
    import llava_ui.model.device as device
    from llava_ui.errors import UserError

    FakeGpus(monkeypatch, compiled=False)
    monkeypatch.setattr(device, "bf16_units", lambda: "AMX")
    policy = device.choose()
    assert (policy.device, policy.dtype, policy.weights_dtype) == ("cpu", "bfloat16", "float32")
    assert policy.precision == "bf16 on oneDNN (AMX)"
    assert "no GPU found" in policy.reason and "AMX" in policy.reason
    assert device.choose(dtype="float32").dtype == "float32"
    monkeypatch.setattr(device, "bf16_units", lambda: None)
    assert device.choose().dtype == "float32"
    assert device.choose().precision == "fp32 (this CPU has no bf16 units)"
    with pytest.raises(UserError, match="AMX or AVX-512 BF16"):
        device.choose("cpu", "bfloat16")
    with pytest.raises(UserError, match="needs a GPU"):
        device.choose("cpu", "float16")


def test_a_gpu_keeps_the_stored_weight_layout_whatever_the_batch_slots(monkeypatch):
    """The options an engine loads with, on each device kind (the CUDA queries mocked, the CPU's bf16 units and
    the kernel's availability set): one typed object, the layout picked once from device, dtype and slots."""
    import llava_ui.model.device as device
    import llava_ui.model.options as engine_options
    from llava_ui.errors import UserError
    from llava_ui.model import kernels

    FakeGpus(monkeypatch, A10G)
    for dtype in ("bfloat16", "float16", "float32"):
        chosen = engine_options.options("gpu", dtype, batch_slots=4)
        assert (chosen.device, chosen.layout, chosen.kv_dtype) == ("gpu:0", "in-out", dtype)
    FakeGpus(monkeypatch, compiled=False)
    monkeypatch.setattr(device, "bf16_units", lambda: "AVX-512 BF16")
    assert engine_options.options("cpu", "float32", batch_slots=4).layout == "out-in"
    assert engine_options.options("cpu", "float32", batch_slots=1).layout == "in-out"
    monkeypatch.setattr(kernels, "enabled", lambda: True)
    monkeypatch.setattr(kernels, "available", lambda progress=None: True)
    chosen = engine_options.options("cpu", "bfloat16", batch_slots=4)  # bf16 on the CPU: packed for the kernels
    assert (chosen.layout, chosen.kv_dtype, chosen.bf16_vision) == ("bf16", "bfloat16", True)
    summary = chosen.summary()
    assert summary["batch_slots"] == 4 and summary["weight_layout"] == "bf16" and summary["weights"].startswith("bf16")
    # where the kernels cannot be built: fp32, with the reason; bf16 asked for is refused with it
    monkeypatch.setattr(kernels, "available", lambda progress=None: False)
    monkeypatch.setattr(kernels, "why_unavailable", lambda: "cannot be built here (RuntimeError: no C++ compiler)")
    chosen = engine_options.options("cpu", None, batch_slots=4)
    assert (chosen.dtype, chosen.layout, chosen.kv_dtype, chosen.bf16_vision) == ("float32", "out-in", "float32", False)
    assert chosen.policy.reason.endswith("fp32: this CPU has AVX-512 BF16 units, but the bf16 kernels cannot be "
                                         "built here (RuntimeError: no C++ compiler)")
    assert chosen.summary()["weights"] == "fp32, stored [out, in] for batched steps"
    with pytest.raises(UserError, match="no C\\+\\+ compiler.*use --dtype float32"):
        engine_options.options("cpu", "bfloat16", batch_slots=4)
    monkeypatch.setattr(kernels, "available", lambda progress=None: True)  # turned off: fp32 too, and why
    assert "turned off (LLAVA_UI_BF16_KERNEL=off)" in engine_options.options("cpu", None, bf16_kernel=False).policy.reason
    with pytest.raises(UserError, match="turned off"):
        engine_options.options("cpu", "bfloat16", bf16_kernel=False)
    with pytest.raises(UserError, match="batch slots"):
        engine_options.options("cpu", "float32", batch_slots=0)


def _prefill_and_turn(model, embeds, split: int):
    """Hidden states of a prompt prefilled whole, then of its last part over the first `split` positions cached (a
    later turn reusing a prefix)."""
    whole, _ = model.forward_hidden(embeds)
    prefix, cache = model.forward_hidden(embeds[:, :split])
    turn, _ = model.forward_hidden(embeds[:, split:], cache.prefix(split), split)
    return whole.numpy(), np.concatenate([prefix.numpy(), turn.numpy()], axis=1)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return build_model(tiny_dir, progress=lambda *a, **k: None)[0]


def test_the_fused_attention_computes_what_the_cpu_path_does(tiny_model, monkeypatch):
    """The GPU's prefill path (forced here on the CPU, where Paddle runs its plain kernel) against the CPU's
    blockwise path: the same function, q scaled inside the kernel instead of before it."""
    runner = tiny_model.runner
    embeds = paddle.to_tensor(np.random.default_rng(0).standard_normal((1, 45, 64)).astype(np.float32))
    with paddle.no_grad():
        cpu = _prefill_and_turn(tiny_model, embeds, split=29)  # 45 keys: the mask is padded to 48
        monkeypatch.setattr(runner, "fused_attention", True)
        fused = _prefill_and_turn(tiny_model, embeds, split=29)
    for a, b in zip(cpu, fused):
        assert np.allclose(a, b, atol=1e-5 * np.abs(a).max()), np.abs(a - b).max()


class FakeGpuPlace:
    def is_gpu_place(self):
        return True

    def is_custom_place(self):
        return False

    def gpu_device_id(self):
        return 0


def _kernel_paddle_picks(call: dict, dtype, capability, monkeypatch) -> str:
    """The backend Paddle's scaled_dot_product_attention selects for this call's arguments on a GPU of this
    compute capability, in this dtype (its own selection code, with the hardware queries mocked)."""
    import paddle.nn.functional.sdpa as sdpa

    monkeypatch.setattr(paddle.device, "is_bf16_supported", lambda **kw: True)
    monkeypatch.setattr(sdpa, "_config", {})
    sdpa.init_config()
    monkeypatch.setattr(sdpa, "check_cuda_is_available", lambda: True)
    monkeypatch.setattr(sdpa, "_get_enabled_backends", lambda: list(sdpa.SDPBackend)[1:])  # a CUDA build's flags
    monkeypatch.setattr(paddle.device, "get_all_device_type", lambda: ["cpu", "gpu"])
    monkeypatch.setattr(sdpa, "get_device_capability", lambda device_id: capability)
    for name in ("check_sm_version", "check_flash_attention_hardware_support", "check_mem_efficient_hardware_support",
                 "minimum_gemm_alignment", "use_tensor_cores"):
        cached = getattr(sdpa, name)
        monkeypatch.setattr(sdpa, name, getattr(cached, "__wrapped__", cached))  # uncached: they read the mocks
    q, k, v, mask = call["q"], call["k"], call["v"], call["attn_mask"]
    params = sdpa.SDPParams(query_shape=q.shape, key_shape=k.shape, value_shape=v.shape,
                            attn_mask_shape=None if mask is None else mask.shape, dropout=0.0,
                            is_causal=call["is_causal"], scale=call["scale"], query_stop_gradient=True,
                            dtype=(dtype,) * 3, place=(FakeGpuPlace(),) * 3)
    return sdpa.select_sdp_for_sdpa(params)


def test_gpu_prefill_attention_reaches_paddles_flash_and_memory_efficient_kernels(tiny_model, monkeypatch):
    import paddle.nn.functional as F

    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, training=True, backend=None, scale=None,
            **kw):
        calls.append(dict(q=q, k=k, v=v, attn_mask=attn_mask, is_causal=is_causal, scale=scale))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, training=training, scale=scale, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(tiny_model.runner, "fused_attention", True)
    embeds = paddle.to_tensor(np.random.default_rng(1).standard_normal((1, 45, 64)).astype(np.float32))
    with paddle.no_grad():
        _prefill_and_turn(tiny_model, embeds, split=29)
    first = [c for c in calls if c["attn_mask"] is None]
    masked = [c for c in calls if c["attn_mask"] is not None]
    assert first and masked and all(c["scale"] is None for c in calls)
    assert all(c["is_causal"] for c in first)
    assert len({id(c["attn_mask"]) for c in masked}) == 1  # one mask per step, shared by every layer and part
    mask = masked[0]["attn_mask"]
    assert mask.dtype == masked[0]["q"].dtype and mask.place == masked[0]["q"].place
    assert mask.shape == [1, 1, 16, 48] and masked[0]["k"].shape[1] == 48  # 45 keys padded to a multiple of 8
    assert np.isinf(mask.numpy()[0, 0, 0, 30:]).all() and (mask.numpy()[0, 0, -1, :45] == 0).all()
    for dtype, capability, kernel in ((paddle.bfloat16, (8, 6), "flash_attn"), (paddle.float16, (8, 0), "flash_attn"),
                                      (paddle.float16, (7, 5), "mem_efficient")):
        assert _kernel_paddle_picks(first[0], dtype, capability, monkeypatch) == kernel
    for dtype, capability in ((paddle.bfloat16, (8, 6)), (paddle.float16, (7, 5))):
        assert _kernel_paddle_picks(masked[0], dtype, capability, monkeypatch) != "math"
    # what the selection refuses: any scale (flash), a mask of 45 keys (memory-efficient)
    assert _kernel_paddle_picks({**first[0], "scale": 1.0}, paddle.bfloat16, (8, 6), monkeypatch) != "flash_attn"
    unpadded = {**masked[0], "attn_mask": mask[..., :45], "k": masked[0]["k"][:, :45], "v": masked[0]["v"][:, :45]}
    assert _kernel_paddle_picks(unpadded, paddle.float16, (7, 5), monkeypatch) == "math"


def test_an_fp16_overflow_in_the_prefill_names_float32(tiny_model, monkeypatch):
    """fp16 has no CPU kernels here: the guard is armed for float32, and an infinite weight stands for an overflow."""
    from llava_ui.errors import UserError
    from llava_ui.model import qwen2

    embeds = paddle.to_tensor(np.random.default_rng(2).standard_normal((1, 9, 64)).astype(np.float32))
    monkeypatch.setattr(qwen2, "OVERFLOW_CHECKED", (paddle.float32,))
    with paddle.no_grad():
        tiny_model.forward_hidden(embeds)  # finite: no complaint
        feed = tiny_model.runner.parts[0][1][0]
        saved = feed.down_rows
        feed.down_rows = saved * np.inf
        try:
            with pytest.raises(UserError, match="overflowed float32.*--dtype float32"):
                tiny_model.forward_hidden(embeds)
        finally:
            feed.down_rows = saved
    assert qwen2.check_finite(paddle.to_tensor([1.0, 2.0], dtype="float16")) is None
    with pytest.raises(UserError, match="overflowed float16 .*--dtype float32"):
        qwen2.check_finite(paddle.to_tensor([1.0, np.inf], dtype="float16"))


@pytest.mark.slow
def test_the_real_size_checkpoint_loads_in_bf16(real_checkpoint):
    folder = real_checkpoint
    layout = detect_layout(folder)
    model, config, _ = build_model(folder, "bfloat16", progress=lambda *a, **k: None)
    state = convert_state(open_weights(weight_files(folder)), layout, config.text["tie_word_embeddings"])
    params = dict(model.named_parameters())
    assert {str(p.dtype) for p in params.values()} == {"paddle.bfloat16"}
    for name in ("language_model.qwen2.embed_tokens.weight", "language_model.qwen2.layers.23.self_attn.o_proj.weight",
                 "vision_tower.vision_model.embeddings.patch_embedding.weight", "mm_projector.2.weight"):
        assert np.array_equal(_as_float32(params[name]), _bf16_of(np.asarray(state[name], np.float32))), name

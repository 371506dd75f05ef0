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

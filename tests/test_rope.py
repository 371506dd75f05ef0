"""RoPE tables: built once for the first 4,096 positions and doubled when a position outgrows them, never rebuilt
per token; a position's values do not depend on when the tables were built."""
import numpy as np
import paddle

from llava_ui.checkpoints.load import build_model
from llava_ui.engine.steps import decode_one_token
from llava_ui.model.attention import ROTARY_POSITIONS, RotaryTables


def test_tables_grow_by_doubling_over_a_long_decode():
    tables = RotaryTables(64, 1e6)
    for position in range(20_000):
        tables.get(position, 1, "float32")
    assert tables.builds == 4  # 4,096 → 8,192 → 16,384 → 32,768 positions
    assert tables.cos.shape[0] == 8 * ROTARY_POSITIONS


def test_a_position_has_the_same_values_whatever_the_tables_size():
    grown = RotaryTables(64, 1e6)
    for position in (0, 5_000, 11_700):
        grown.get(position, 1, "float32")
    for position in (0, 4_095, 4_096, 11_699, 11_700):
        fresh = RotaryTables(64, 1e6)
        cos, sin = fresh.get(position, 1, "float32")
        assert np.array_equal(grown.get(position, 1, "float32")[0].numpy(), cos.numpy())
        assert np.array_equal(grown.get(position, 1, "float32")[1].numpy(), sin.numpy())
    positions = np.arange(11_700, 11_702, dtype=np.float64)[:, None]
    inv_freq = 1.0 / 1e6 ** (np.arange(0, 64, 2) / 64)
    reference = np.cos(np.concatenate([positions * inv_freq] * 2, axis=-1))
    assert np.allclose(grown.get(11_700, 2, "float32")[0].numpy()[:, 0], reference, atol=2e-3)


def test_decoding_past_4096_positions_builds_the_tables_once_more(tiny_dir):
    model, _, _ = build_model(tiny_dir, progress=lambda *a, **k: None)
    runner = model.runner
    start, steps = ROTARY_POSITIONS - 40, 200
    cache = model.reserve(None, start + steps)
    cache.length = start  # the positions' contents do not matter here, only where decoding happens
    with paddle.no_grad():
        for position in range(start, start + steps):
            _, cache = decode_one_token(model, 5, cache, position)
    assert runner.rotary.builds == 2  # the first 4,096 positions, then 8,192: not one build a token past 4,096

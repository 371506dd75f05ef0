"""Weight-only int8 (--weights int8) against fp32, on the same weights and prompts, as tests/test_bf16.py does for
bf16: max |Δlogit| / max |logit|, the cosine of the last hidden state, greedy agreement where fp32's lead is clear.

The bounds are set from int8's precision, not from what was measured. Each output's weights are rounded to steps
of max|w| / 127, an error uniform within half a step (standard deviation step / √12). For a column of k roughly
Gaussian weights (standard deviation σ) the largest is about σ·√(2 ln 2k), 3.5σ to 4.3σ for k = 64 to 4,864, so
a product's relative error is about 4 / (127·√12) ≈ 0.009; through ~50 matmuls with independent roundings,
0.009·√50 ≈ 0.065, and bf16's rounding of the activations (0.03, test_bf16.py) adds √(0.065² + 0.03²) ≈ 0.07.
So: max |Δlogit| ≤ 14 % of max |logit| (twice the estimate), cosine of the last hidden state ≥ 0.99 (an error of
14 % in norm costs 1 - cos ≈ 0.14² / 2 ≈ 0.01). Greedy tokens must agree wherever fp32's top-1 lead is at least
twice the measured logit error.
"""
import json
from pathlib import Path

import numpy as np
import paddle
import pytest
from cpu_kinds import needs_bf16_units
from test_bf16 import _cpu, compare, prompt_embeds

from llava_ui.engine import Engine
from llava_ui.checkpoints.load import build_model
from llava_ui.errors import UserError
from llava_ui.model import device, kernels
from llava_ui.model import options as engine_options
from llava_ui.model.cpu import bf16_units
from llava_ui.model.device import DevicePolicy

pytestmark = needs_bf16_units
MAX_LOGIT_ERROR, MIN_COSINE = 0.14, 0.99


@pytest.fixture(autouse=True)
def _kernel_built():
    if not kernels.available():
        pytest.skip("the CPU kernels cannot be built here")


def check(report: dict) -> None:
    assert 0 < report["max_logit_error"] <= MAX_LOGIT_ERROR, report  # (0: int8 did not run)
    assert report["cosine_last_hidden"] >= MIN_COSINE, report
    assert report["clear_lead_disagreements"] == 0, report


@pytest.fixture(scope="module")
def tiny_fp32(checkpoints):
    return build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None)[0]


@pytest.fixture(scope="module")
def tiny_int8(checkpoints):
    model = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None, "int8")[0]
    model.use_bf16()
    return model


@pytest.mark.parametrize("text_tokens, images", [(300, 1), (200, 2), (20, 0)])
def test_tiny_int8_agrees_with_fp32(tiny_fp32, tiny_int8, text_tokens, images):
    """Prompts of several chunks (prefill through oneDNN over the int8 weights) and a short one, then 32 decode
    steps (the int8 kernel)."""
    report = compare(tiny_fp32, tiny_int8, prompt_embeds(tiny_int8, text_tokens, images))
    check(report)


def test_int8_holds_every_language_model_weight_once_in_int8(tiny_fp32, tiny_int8):
    """Every layer weight and the head are int8 matrices (a byte a weight and a scale an output), no fp32 matrix of
    the layers is left, and a tied head's token lookups read its int8 rows: each within half a step."""
    runner = tiny_int8.runner
    assert runner.layout == "int8"
    for (attention, feed), (exact_attention, exact_feed) in zip(runner.parts, tiny_fp32.runner.parts):
        for part, exact in zip(attention + feed, exact_attention + exact_feed):
            for name in part.WEIGHTS:
                matrix = getattr(part, name)
                assert isinstance(matrix, kernels.Int8Matrix) and matrix.shape == list(getattr(exact, name).shape)
    layer = tiny_int8.language_model.qwen2.layers[0]
    assert layer.self_attn.q_proj.weight is None and layer.mlp.down_proj.weight is None
    assert tiny_int8.language_model.lm_head.weight is None and tiny_int8.language_model.qwen2.embed_tokens.weight is None
    vocab = tiny_fp32.embed_tokens.weight.shape[0]
    assert sum(matrix.outputs for matrix in runner.head) == vocab
    ids = paddle.to_tensor([[vocab - 1, 0, 5], [7, vocab // 2, vocab - 2]])  # rows of both shares, in any order
    looked_up, exact = tiny_int8.embed_tokens(ids).numpy(), tiny_fp32.embed_tokens(ids).numpy()
    assert looked_up.shape == exact.shape and looked_up.dtype == np.float32
    steps = np.concatenate([m.scales.numpy() for m in runner.head])[ids.numpy()]
    assert np.all(np.abs(looked_up - exact) <= steps[..., None] / 2 * (1 + 1e-5))


def test_the_engine_computes_with_int8_weights_and_reports_them(tiny_dir):
    engine = Engine(str(tiny_dir), dtype="bfloat16", weights="int8").load()
    options = engine.status()["options"]
    assert options["weight_layout"] == "int8" and options["kv_cache"] == "bfloat16"
    assert options["weights"].startswith("int8 per output channel")
    from llava_ui.chat.conversation import Conversation
    from llava_ui.config import GenerationSettings

    conversation = Conversation()
    conversation.add_user("Say something.")
    final = engine.generate(conversation, GenerationSettings(max_new_tokens=6, temperature=0))
    assert final.stats.generated_tokens == 6 and final.stats.weights.startswith("int8 per output channel")


def test_int8_is_refused_where_it_cannot_run(monkeypatch):
    """--weights int8 runs on the CPU kernels in bf16: asked with --dtype float32, on a GPU, on a CPU without bf16
    units or where the kernels cannot be built, the load stops with why."""
    with pytest.raises(UserError, match="drop --dtype float32"):
        engine_options.options("cpu", "float32", weights="int8")
    with pytest.raises(UserError, match="--weights int4: one of auto, int8"):
        engine_options.options("cpu", None, weights="int4")
    monkeypatch.setattr(device, "choose", lambda *a: DevicePolicy("gpu:0", "bfloat16", "a GPU"))
    with pytest.raises(UserError, match="runs on the CPU kernels; on a GPU"):
        engine_options.options(None, None, weights="int8")
    monkeypatch.setattr(device, "choose", lambda *a: DevicePolicy("cpu", "float32", "this CPU has no bf16 units"))
    monkeypatch.setattr(device, "bf16_units", lambda: None)
    with pytest.raises(UserError, match="needs a CPU with AMX or AVX-512 BF16 units \\(this CPU has no bf16"):
        engine_options.options(None, None, weights="int8")
    monkeypatch.setattr(device, "choose", lambda *a: DevicePolicy("cpu", "bfloat16", "bf16 units"))
    monkeypatch.setattr(kernels, "available", lambda progress=None: False)
    with pytest.raises(UserError, match="needs the CPU kernels, which cannot be built"):
        engine_options.options(None, None, weights="int8")


@pytest.mark.slow
def test_real_size_int8_agrees_with_fp32(real_checkpoint):
    """At the real dimensions: a prompt with an image and a long text one."""
    exact = build_model(real_checkpoint, "float32", lambda *a, **k: None)[0]
    model = build_model(real_checkpoint, "float32", lambda *a, **k: None, "int8")[0]
    model.use_bf16(release_fp32=True)
    reports = {name: compare(exact, model, prompt_embeds(model, text, images))
               for name, text, images in (("1-image", 30, 1), ("text-700", 700, 0))}
    (Path(__file__).parent.parent / "bench" / "results" / "int8-agreement.json").write_text(
        json.dumps({"cpu": _cpu(), "units": bf16_units(), **reports}, indent=1) + "\n")
    print(json.dumps(reports, indent=1))
    for report in reports.values():
        check(report)

"""The CPU's bf16 path (the language model on the CPU kernels, the vision tower as oneDNN programs) against the
fp32 path, on the same weights and prompts: max |Δlogit| / max |logit|, the cosine of the last hidden state, greedy agreement over 32 tokens.

The bounds are set from bf16's precision, not from what was measured: bf16 keeps 8 significant bits (unit
roundoff 2^-8 ≈ 0.004 per rounding); through ~50 matmul layers with independent roundings the relative error of
an output grows like 0.004·√50 ≈ 0.03. So: max |Δlogit| ≤ 5 % of max |logit|, cosine of the last hidden state
≥ 0.999 (an error of 3 % in norm costs 1 - cos ≈ 0.03² / 2 = 5e-4). Greedy agreement on random weights is
reported (random logits are near-ties, so flips say little) and must hold where fp32's top-1 lead is at least
twice the measured logit error.
"""
import json
import os
import shutil
import resource
from pathlib import Path

import numpy as np
import paddle
import pytest

from llava_ui.engine import Engine
from llava_ui.checkpoints.load import build_model
from llava_ui.model.cpu import release_free_memory
from llava_ui.engine.steps import decode_one_token
from llava_ui.model.cpu import bf16_units
from cpu_kinds import needs_bf16_units
from llava_ui.model import kernels

needs_units = needs_bf16_units
needs_kernel = needs_bf16_units


def kernel_or_skip():
    if not kernels.available():
        pytest.skip("the bf16 linear kernel cannot be built here")
MAX_LOGIT_ERROR, MIN_COSINE, STEPS = 0.05, 0.999, 32


def test_bf16_units_are_read_from_the_cpu_flags():
    assert bf16_units("flags\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile\n") == "AMX"
    assert bf16_units("flags\t: fpu sse avx512f avx512_bf16\n") == "AVX-512 BF16"
    assert bf16_units("flags\t: fpu sse avx2 fma\n") is None
    assert bf16_units("") is None


def compare(exact, model, embeds, steps: int = STEPS) -> dict:
    """fp32 (the model `exact`) then bf16 (`model`) over the same prompt: the first logits, the last hidden state,
    and 32 teacher-forced steps (both fed fp32's greedy tokens, so every step compares the same input)."""
    runs = {}
    for name, model in (("fp32", exact), ("bf16", model)):
        hidden, cache = prefill_hidden(model, embeds)
        logits = [model.logits(hidden[:, -1])[0].numpy()]
        position, tokens = embeds.shape[1], runs.get("fp32", {}).get("tokens")
        fed = []
        for step in range(steps):
            token = int(np.argmax(logits[-1])) if tokens is None else tokens[step]
            fed.append(token)
            out, cache = decode_one_token(model, token, cache, position)
            logits.append(out.numpy())
            position += 1
        runs[name] = {"hidden": hidden[0, -1].numpy(), "logits": np.stack(logits), "tokens": fed}
    a, b = runs["fp32"], runs["bf16"]
    error = np.abs(a["logits"] - b["logits"]).max(axis=1) / np.abs(a["logits"]).max(axis=1)
    hidden_a, hidden_b = a["hidden"].astype(np.float64), b["hidden"].astype(np.float64)
    top2 = np.sort(a["logits"], axis=1)[:, -2:]
    lead = (top2[:, 1] - top2[:, 0]) / np.abs(a["logits"]).max(axis=1)
    agree = np.argmax(a["logits"], axis=1) == np.argmax(b["logits"], axis=1)
    return {"max_logit_error": float(error.max()),
            "cosine_last_hidden": float(hidden_a @ hidden_b / np.linalg.norm(hidden_a) / np.linalg.norm(hidden_b)),
            "greedy_agreement": int(agree[1:].sum()), "steps": steps,
            "clear_lead_disagreements": int((~agree & (lead > 2 * error)).sum())}


def prefill_hidden(model, embeds):
    """The prompt chunk by chunk, as the engine's prefill hands it over: (the last chunk's hidden states, the
    cache)."""
    chunk, cache = model.prefill_chunk(embeds), model.reserve(None, embeds.shape[1] + STEPS + 1)
    for start in range(0, embeds.shape[1], chunk):
        hidden, cache = model.forward_hidden(embeds[:, start:start + chunk], cache, start)
    return hidden, cache


def prompt_embeds(model, text_tokens: int, images: int, seed: int = 0):
    """Text tokens around `images` images (random pixels through the vision tower of the path under test)."""
    rng = np.random.default_rng(seed)
    side = model.config.vision.image_size
    ids = rng.integers(0, 200, text_tokens).tolist()
    pieces, cut = [], np.linspace(0, text_tokens, images + 2).astype(int)[1:-1]
    start = 0
    for i, end in enumerate(list(cut) + [text_tokens]):
        pieces.append(model.embed_tokens(paddle.to_tensor(ids[start:end])))
        if i < images:
            pixels = rng.uniform(-1, 1, (1, 3, side, side)).astype("float32")
            pieces.append(model.encode_views(pixels)[0])
        start = end
    return paddle.concat(pieces).unsqueeze(0)


def vision_agreement(model) -> dict:
    side = model.config.vision.image_size
    pixels = np.random.default_rng(5).uniform(-1, 1, (2, 3, side, side)).astype("float32")
    bf16, model.bf16 = model.bf16, None
    fp32 = model.encode_views(pixels).numpy().astype(np.float64).ravel()
    model.bf16 = bf16
    low = model.encode_views(pixels).numpy().astype(np.float64).ravel()
    return {"max_feature_error": float(np.abs(fp32 - low).max() / np.abs(fp32).max()),
            "cosine_features": float(fp32 @ low / np.linalg.norm(fp32) / np.linalg.norm(low))}


def check(report: dict) -> None:
    if "max_feature_error" in report:
        assert 0 < report["max_feature_error"] <= MAX_LOGIT_ERROR and report["cosine_features"] >= MIN_COSINE
        return
    assert 0 < report["max_logit_error"] <= MAX_LOGIT_ERROR, report  # (0: the bf16 path did not run)
    assert report["cosine_last_hidden"] >= MIN_COSINE, report
    assert report["clear_lead_disagreements"] == 0, report


@pytest.fixture(scope="module")
def tiny_fp32(checkpoints):
    return build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None)[0]


@pytest.fixture(scope="module")
def tiny_bf16(checkpoints):
    """The bf16 model as the engine loads it: the language model on the bf16 kernels (weights packed in bf16
    once), the vision tower as oneDNN bf16 programs (its fp32 weights kept: vision_agreement reads them)."""
    kernel_or_skip()
    model, _, _ = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None, "bf16")
    model.use_bf16()
    assert model.runner.layout == "bf16" and model.bf16 is not None
    return model


@needs_units
@pytest.mark.parametrize("text_tokens, images", [(300, 1), (200, 2), (90, 0), (20, 0)])
def test_tiny_bf16_agrees_with_fp32(tiny_fp32, tiny_bf16, text_tokens, images):
    """Prompts of several chunks (the last one padded), with and without images, and a short one."""
    embeds = prompt_embeds(tiny_bf16, text_tokens, images)
    check(compare(tiny_fp32, tiny_bf16, embeds))


@needs_units
def test_the_kernel_holds_the_language_model_in_bf16_only(checkpoints, tiny_fp32):
    """With the kernel, every layer weight and the head are oneDNN's packed bf16 (half the fp32 bytes), no fp32
    matrix of the layers is left, and no oneDNN program is made for the language model."""
    if not kernels.available():
        pytest.skip("the bf16 linear kernel cannot be built here")
    model, _, _ = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None, "bf16")
    assert model.runner.layout == "bf16"
    fp32_parts = tiny_fp32.runner.parts
    for (attention, feed), (exact_attention, exact_feed) in zip(model.runner.parts, fp32_parts):
        for part, exact in zip(attention + feed, exact_attention + exact_feed):
            for name in part.WEIGHTS:
                matrix = getattr(part, name)
                assert isinstance(matrix, kernels.Bf16Matrix)
                assert matrix.shape == list(getattr(exact, name).shape)
                assert matrix.nbytes >= 2 * int(np.prod(matrix.shape))
    for layer in model.language_model.qwen2.layers:
        assert all(getattr(layer.self_attn, n).weight is None for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert all(getattr(layer.mlp, n).weight is None for n in ("gate_proj", "up_proj", "down_proj"))
    vocab = tiny_fp32.embed_tokens.weight.shape[0]
    assert sum(matrix.shape[1] for matrix in model.runner.head) == vocab
    assert model.language_model.lm_head.weight is None and model.language_model.qwen2.embed_tokens.weight is None
    ids = paddle.to_tensor([0, 5, vocab - 1])  # the bf16 table: the fp32 rows rounded, handed on in fp32
    looked_up, exact = model.embed_tokens(ids), tiny_fp32.embed_tokens(ids)
    assert looked_up.dtype == paddle.float32
    assert np.abs(looked_up.numpy() - exact.numpy()).max() <= 2 ** -8 * np.abs(exact.numpy()).max()


@needs_units
def test_tiny_bf16_vision_agrees_with_fp32(tiny_bf16):
    check(vision_agreement(tiny_bf16))


@needs_units
def test_released_fp32_vision_weights_encode_the_same_and_the_fp32_vision_path_refuses(checkpoints):
    """The engine gives back the fp32 vision matrices once oneDNN holds their bf16 copies: the features stay
    bit for bit what they were, the pages are gone (zeros), and nothing falls back to those weights silently."""
    model, _, _ = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None)
    model.use_bf16()
    side = model.config.vision.image_size
    pixels = np.random.default_rng(3).uniform(-1, 1, (2, 3, side, side)).astype("float32")
    before = model.encode_views(pixels).numpy()
    matrix = model.vision_tower.vision_model.encoder.layers[0].mlp.fc1.weight
    assert np.abs(matrix.numpy()).max() > 0
    released = model.bf16.release_fp32_vision()
    assert released > 0 and not model.fp32_vision
    assert np.array_equal(model.encode_views(pixels).numpy(), before)
    assert (matrix.numpy() == 0).mean() > 0.5  # (18 KB: all but its partial first and last pages read zero)
    bf16, model.bf16 = model.bf16, None
    with pytest.raises(RuntimeError, match="only the bf16 programs can encode"):
        model.encode_views(pixels)
    model.bf16 = bf16
    # what the engine does: each layer released during the warm-up, right after its conversion
    early, _, _ = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None)
    early.use_bf16(release_fp32=True)
    assert early.bf16.released == released and not early.fp32_vision
    assert np.array_equal(early.encode_views(pixels).numpy(), before)


@needs_units
def test_release_keeps_the_fp32_vision_weights_where_a_program_reads_them(checkpoints):
    """If a Paddle build's fc read its weights on every call, the first layer's check sees its output change:
    that layer's matrices are restored, nothing else is released, and the fp32 path keeps working."""
    model, _, _ = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None)
    model.use_bf16()
    first = model.bf16.vision[0]
    matrices = [w for w in first.weights if w.ndim == 2]
    originals = [w.numpy().copy() for w in matrices]

    class ReadsItsWeights:  # a stand-in program whose output follows its weights' current values
        weights = first.weights

        def __call__(self, x):
            return [x + float(matrices[0].sum())]

    model.bf16.vision[0] = ReadsItsWeights()
    try:
        assert model.bf16.release_fp32_vision() == 0
    finally:
        model.bf16.vision[0] = first
    assert model.fp32_vision and all(np.array_equal(w.numpy(), o) for w, o in zip(matrices, originals))
    check(vision_agreement(model))


@needs_units
def test_the_programs_refuse_a_thread_other_than_the_one_that_prepared_them(checkpoints):
    """oneDNN's bf16 weight copies are per thread: from another thread the programs would convert the weights again
    (zeros, once given back), so they refuse; their own thread still gets the same features."""
    import threading

    model, _, _ = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None)
    model.use_bf16(release_fp32=True)
    side = model.config.vision.image_size
    pixels = np.random.default_rng(6).uniform(-1, 1, (1, 3, side, side)).astype("float32")
    before = model.encode_views(pixels).numpy()
    errors = []

    def elsewhere():
        try:
            model.encode_views(pixels)
        except RuntimeError as err:
            errors.append(str(err))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert errors and "thread that prepared them" in errors[0]
    assert np.array_equal(model.encode_views(pixels).numpy(), before)


def test_the_engine_releases_the_fp32_vision_weights_on_bf16_only(tiny_dir):
    if bf16_units() is not None:
        assert not Engine(str(tiny_dir), dtype="bfloat16").load().model.fp32_vision
    assert Engine(str(tiny_dir), dtype="float32").load().model.fp32_vision


@needs_units
def test_programs_are_exported_once_and_reused(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_UI_HOME", str(tmp_path))
    model, _, _ = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None)
    model.use_bf16()
    folders = sorted(p.name for p in (tmp_path / "programs").iterdir())
    assert model.bf16.export_seconds > 0
    assert len(folders) == model.config.vision.num_hidden_layers  # (the language model's bf16: the kernels)
    again, _, _ = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None)
    again.use_bf16()
    assert again.bf16.export_seconds == 0 and sorted(p.name for p in (tmp_path / "programs").iterdir()) == folders
    assert all(json.loads((tmp_path / "programs" / f / "key.json").read_text())["paddle"] == paddle.__version__
               for f in folders)


@needs_units
def test_an_export_replaces_the_same_programs_of_earlier_code_and_keeps_other_dimensions(checkpoints, tmp_path,
                                                                                        monkeypatch):
    """After an upgrade (other code or Paddle), the new export removes the old one of the same program and
    dimensions, so the cache does not grow by a full set of programs per version; another checkpoint's
    dimensions are kept."""
    monkeypatch.setenv("LLAVA_UI_HOME", str(tmp_path))
    model, _, _ = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None)
    model.use_bf16()
    programs = tmp_path / "programs"
    current = {p.name for p in programs.iterdir()}
    name = next(n for n in current if n.startswith("vision0-"))
    stored = json.loads((programs / name / "key.json").read_text())
    stem = name.rsplit("-", 1)[0]
    for suffix, dims in (("0123456789abcdef", stored["dims"]), ("fedcba9876543210", {"other": "dimensions"})):
        (programs / f"{stem}-{suffix}").mkdir()
        (programs / f"{stem}-{suffix}" / "key.json").write_text(json.dumps({**stored, "dims": dims}))
    for folder in current:
        shutil.rmtree(programs / folder)  # as if this code had never exported: the next load exports again
    again, _, _ = build_model(checkpoints("paddlenlp", vocab="bytes"), "float32", lambda *a, **k: None)
    again.use_bf16()
    left = {p.name for p in programs.iterdir()}
    assert left == current | {f"{stem}-fedcba9876543210"}


@needs_units
def test_engine_reports_its_precision(tiny_dir):
    engine = Engine(str(tiny_dir), dtype="bfloat16").load()
    assert engine.status()["precision"] == f"bf16 on oneDNN ({bf16_units()})"
    exact = Engine(str(tiny_dir), dtype="float32").load()
    assert exact.model.bf16 is None and exact.status()["precision"].startswith("fp32")


def rss_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


@pytest.mark.slow
@needs_units
def test_real_size_bf16_agrees_with_fp32_and_memory_stays_bounded(real_checkpoint, tmp_path):
    """At the real dimensions, per case; prompts of other lengths and cache capacities must not make oneDNN keep
    more weight copies (its cache is per input shape: every program runs at one shape)."""
    kernel_or_skip()
    exact, _, _ = build_model(real_checkpoint, "float32", lambda *a, **k: None)
    model, _, _ = build_model(real_checkpoint, "float32", lambda *a, **k: None, "bf16")
    model.use_bf16()
    reports = {"vision": vision_agreement(model)}
    cases = (("2-images", 40, 2), ("1-image", 30, 1), ("text-700", 700, 0))  # the longest prompt first
    reports[cases[0][0]] = compare(exact, model, prompt_embeds(model, *cases[0][1:]))
    release_free_memory()
    settled = rss_gb()  # after the largest case: shorter prompts at other cache capacities must not grow it
    for name, text, images in cases[1:]:
        reports[name] = compare(exact, model, prompt_embeds(model, text, images))
    release_free_memory()
    reports["rss_growth_gb"] = rss_gb() - settled
    reports["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    (Path(__file__).parent.parent / "bench" / "results" / "bf16-agreement.json").write_text(
        json.dumps({"cpu": _cpu(), "units": bf16_units(), **reports}, indent=1) + "\n")
    print(json.dumps(reports, indent=1))
    for name in ("vision", "1-image", "2-images", "text-700"):
        check(reports[name])
    assert reports["rss_growth_gb"] < 0.3  # a new bf16 copy of the language model's weights would be 0.74 GB


@pytest.mark.slow
@needs_units
def test_real_size_release_gives_back_the_fp32_vision_weights(real_checkpoint):
    """1.6 GB of fp32 vision and projector matrices that only the warm-up read: RSS falls by most of that (part
    of a loaded checkpoint can be unmapped already) and the features stay bit for bit the same."""
    model, _, _ = build_model(real_checkpoint, "float32", lambda *a, **k: None)
    model.use_bf16()
    side = model.config.vision.image_size
    pixels = np.random.default_rng(4).uniform(-1, 1, (1, 3, side, side)).astype("float32")
    before = model.encode_views(pixels).numpy()
    release_free_memory()
    held = rss_gb()
    released = model.bf16.release_fp32_vision()
    gone = held - rss_gb()
    print(f"released {released / 2 ** 30:.2f} GiB of matrices; RSS {held:.2f} -> {held - gone:.2f} GiB")
    assert released > 1.4 * 2 ** 30 and gone > 1.1
    assert np.array_equal(model.encode_views(pixels).numpy(), before)


def _cpu() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown")


FIRST_IN_PROCESS = """
import sys, numpy as np
from llava_ui.checkpoints.load import build_model
quiet = lambda *a, **k: None
model = build_model(sys.argv[1], "float32", quiet, "bf16", bf16_vision=True)[0]  # as the engine loads it
exact = build_model(sys.argv[1], "float32", quiet)[0]
side = model.config.vision.image_size
pixels = np.random.default_rng(3).uniform(-1, 1, (2, 3, side, side)).astype("float32")
low, ref = model.encode_views(pixels).numpy(), exact.encode_views(pixels).numpy()
assert model.bf16.released > 0
print("ERROR", float(np.abs(low - ref).max() / np.abs(ref).max()))
"""


@needs_units
def test_the_first_bf16_model_of_a_process_encodes_right_after_giving_back_its_fp32_vision_weights(checkpoints):
    """In a new process (the app's case), the vision features after the fp32 matrices were given back agree with
    fp32's: a program's first run there does not always leave oneDNN holding its bf16 weights."""
    import subprocess
    import sys

    kernel_or_skip()
    done = subprocess.run([sys.executable, "-c", FIRST_IN_PROCESS, str(checkpoints("paddlenlp", vocab="bytes"))],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    error = float(done.stdout.split("ERROR")[-1])
    assert error <= MAX_LOGIT_ERROR

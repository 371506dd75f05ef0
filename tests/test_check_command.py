"""`llava-ui check`: the device and precision chosen and why, a short generation on the tiny random model (and on
the real one only when a cache holds it), first token, decode speed and peak GPU memory; the GPU branch with
Paddle's CUDA queries mocked. The status bar shows the same choice."""
import paddle
import pytest

from llava_ui.commands import check
from llava_ui.commands.main import main
from llava_ui.web.inspector import status_html
from test_gpu_path import A10G, T4, FakeGpus


@pytest.fixture
def no_real_model(monkeypatch):
    import llava_ui.checkpoints.hub as hub

    monkeypatch.setattr(hub, "cached_model_dir", lambda model: None)


def test_check_on_the_cpu_says_no_gpu_was_found_and_answers(capsys, no_real_model):
    assert main(["check", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "GPU: no GPU found" in out
    assert "chosen: cpu, " in out and "no GPU found" in out.split("chosen:")[1]
    tiny = next(line for line in out.splitlines() if line.startswith("tiny-random: "))
    assert "built on cpu" in tiny and "first token" in tiny and "decode" in tiny
    assert "peak GPU memory n/a (no GPU found)" in tiny
    assert "lmms-lab/llava-next-interleave-qwen-0.5b: skipped, not on this machine" in out
    assert out.rstrip().endswith("check passed")


def test_the_real_model_is_checked_only_when_a_cache_holds_it(monkeypatch, tmp_path):
    import llava_ui.checkpoints.hub as hub

    monkeypatch.setattr(hub, "cached_model_dir", lambda model: tmp_path)
    assert check.models_to_check(None) == [("tiny-random", None), (str(tmp_path), None)]
    monkeypatch.setattr(hub, "cached_model_dir", lambda model: None)
    (model, skipped), = check.models_to_check(["some/model"])[1:]
    assert model == "some/model" and "downloads nothing" in skipped


def test_a_cached_model_is_found_without_downloading(monkeypatch, tmp_path, tiny_dir):
    import shutil

    from llava_ui.checkpoints.hub import cached_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PPNLP_HOME", str(tmp_path))
    assert cached_model_dir(str(tiny_dir)) == tiny_dir
    assert cached_model_dir("no-such-org/no-such-model") is None
    copy = tmp_path / "models" / "some-org" / "some-model"
    shutil.copytree(tiny_dir, copy)
    assert cached_model_dir("some-org/some-model") == copy
    (copy / "model_state.pdparams").unlink()  # a partial download is not a copy
    assert cached_model_dir("some-org/some-model") is None


def test_check_on_mocked_gpus_reports_each_gpu_and_the_choice(monkeypatch, capsys, no_real_model):
    FakeGpus(monkeypatch, T4, A10G)
    monkeypatch.setattr(paddle.version, "cuda", lambda: "12.6")
    monkeypatch.setattr(paddle.device.cuda, "max_memory_allocated", lambda index: 3 * 2**29)
    monkeypatch.setattr(paddle.device.cuda, "max_memory_reserved", lambda index: 2**31)
    runs = []

    def run_model(model, device, dtype, max_new_tokens, weights=None):  # no GPU here: the arguments it would get
        runs.append((model, device, dtype))
        return check.Run(model, "gpu:1", "bf16", "in-out", 1.0, 800, 16, 0.2, 50.0, check.peak_gpu_memory("gpu:1"))

    monkeypatch.setattr(check, "run_model", run_model)
    assert main(["check", "--device", "cuda:1"]) == 0
    out = capsys.readouterr().out
    assert "Paddle built with CUDA 12.6" in out
    assert "GPU: gpu:0 (Tesla T4, compute capability 7.5), no bf16" in out
    assert "GPU: gpu:1 (NVIDIA A10G, compute capability 8.6), bf16" in out
    assert "chosen: gpu:1, bf16 (bfloat16) — gpu:1 (NVIDIA A10G" in out
    assert runs == [("tiny-random", "cuda:1", None)]
    assert "peak GPU memory 1.50 GiB allocated, 2.00 GiB reserved" in out


def test_check_refuses_bf16_on_a_gpu_without_it(monkeypatch, capsys):
    FakeGpus(monkeypatch, T4)
    assert main(["check", "--dtype", "bfloat16"]) == 2
    assert "--dtype bfloat16 needs a GPU of compute capability 8.0" in capsys.readouterr().err


def test_a_failed_generation_fails_the_check(monkeypatch, capsys, no_real_model):
    def broken(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(check, "run_model", broken)
    assert main(["check", "--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert "tiny-random: FAILED: RuntimeError: out of memory" in out and "check failed (1 model)" in out


def test_the_status_bar_shows_the_choice_and_why():
    reason = "gpu:0 (NVIDIA A10G, compute capability 8.6), Paddle sees 1 GPU; bf16, which this GPU has"
    bar = status_html({"state": "ready", "model": "m", "device": "gpu:0", "dtype": "bfloat16", "precision": "bf16",
                       "device_reason": reason})
    assert "gpu:0 · bf16" in bar and reason in bar


def test_an_engine_reports_why_it_chose_its_device(tiny_dir):
    from llava_ui.engine import Engine

    status = Engine(str(tiny_dir), dtype="float32").load().status()
    assert status["device"] == "cpu" and status["device_reason"].startswith("no GPU found")
    assert "float32 asked for" in status["device_reason"]


def test_check_with_int8_weights_refuses_where_they_cannot_run_and_builds_them_where_they_can(capsys,
                                                                                               no_real_model):
    assert main(["check", "--dtype", "float32", "--weights", "int8"]) == 2  # int8 computes in bf16
    assert "--weights int8 computes in bf16" in capsys.readouterr().err
    from llava_ui.model import kernels
    from llava_ui.model.cpu import bf16_units

    if not (bf16_units() and kernels.available()):
        pytest.skip("this CPU cannot run int8 weights (no bf16 units or kernels): the refusal above is its side")
    assert main(["check", "--weights", "int8", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "weights: int8 per output channel" in out and "weights int8" in out and "check passed" in out


def test_check_without_the_cpu_kernels_says_fp32_and_why_and_refuses_bf16(monkeypatch, capsys, no_real_model):
    """A CPU with bf16 units whose kernels are off (or cannot be built) computes in fp32: check reports that
    choice with its reason and runs the tiny model in it; bf16 asked for is refused with the same reason."""
    from llava_ui.model import device

    monkeypatch.setenv("LLAVA_UI_BF16_KERNEL", "off")
    monkeypatch.setattr(device, "bf16_units", lambda: "AVX-512 BF16")  # (either kind of CPU runs this side)
    assert main(["check", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "chosen: cpu, fp32 (float32)" in out and "the bf16 kernels are turned off (LLAVA_UI_BF16_KERNEL=off)" in out
    assert "weights: fp32 as stored" in out and "(fp32, weights in-out)" in out and "check passed" in out
    assert main(["check", "--dtype", "bfloat16"]) == 2
    assert "bf16 on the CPU runs on the CPU kernels, which are turned off" in capsys.readouterr().err

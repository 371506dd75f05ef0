import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LLAVA_UI_HOME", str(ROOT / ".pytest_cache" / "llava_ui_home"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-dimension or long-running tests (run with -m slow)")
    config.addinivalue_line("markers", "browser: real-browser end-to-end tests")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Random tiny checkpoints with the real Qwen vocabulary, one per layout, all from the same weights (seed 0)."""
    from llava_ui.checkpoints.random import write_random_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def get(layout, tie=True, vocab="qwen", hf_naming="legacy"):
        key = (layout, tie, vocab, hf_naming)
        if key not in made:
            name = f"{layout}-{'tied' if tie else 'untied'}-{vocab}-{hf_naming}"
            made[key] = write_random_checkpoint(root / name, layout, "tiny", vocab=vocab, tie=tie, hf_naming=hf_naming)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_dir(checkpoints):
    """A small paddlenlp-layout checkpoint with the byte-level vocabulary: fast to load, for engine/UI tests."""
    return checkpoints("paddlenlp", vocab="bytes")


@pytest.fixture(scope="module")
def hf_dir(checkpoints):
    """The llava-hf layout with the real Qwen vocabulary: transformers loads the very same folder."""
    return checkpoints("hf")


@pytest.fixture(scope="module")
def hf_engine(hf_dir):
    """A recording engine over hf_dir, fp32 named (the host default is bf16 on CPUs with bf16 units), in the flat
    image mode: transformers' image path, computed exactly."""
    from servers import RecordingEngine

    return RecordingEngine(str(hf_dir), dtype="float32", image_mode="flat").load()


@pytest.fixture(scope="session")
def real_checkpoint():
    """LLAVA_UI_REAL_CHECKPOINT, else the benchmark's real-size checkpoint (written once if missing)."""
    given = os.environ.get("LLAVA_UI_REAL_CHECKPOINT")
    if given:
        return Path(given)
    shared = Path.home() / ".cache" / "llava_ui" / "bench-real" / "lmms"  # bench/run.py's, outside the test home
    if (shared / "model.safetensors").exists():
        return shared
    sys.path.insert(0, str(ROOT / "bench"))
    from run import DEFAULT_CHECKPOINTS, ensure_checkpoints

    return ensure_checkpoints(DEFAULT_CHECKPOINTS)["paddle"]

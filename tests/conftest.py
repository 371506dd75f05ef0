import os
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

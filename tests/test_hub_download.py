"""Model ids from the Hugging Face Hub (`hf:<id>`, `--hub hf`, the default on a Space), read offline from a cache
laid out as huggingface_hub lays it out (models--org--name/refs/main → snapshots/<commit>/, files in blobs/)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from llava_ui.checkpoints import hub


def hub_cache(root, repo_id, folder, extra=()):
    """`folder`'s files as one commit of `repo_id` in a huggingface_hub cache under `root`."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in [*folder.iterdir(), *extra]:
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def generate(model, env, *flags):
    done = subprocess.run([sys.executable, "-m", "llava_ui", "generate", "--model", model, "--prompt", "hi",
                           "--max-new-tokens", "4", "--temperature", "0", "--json", *flags],
                          capture_output=True, text=True, env=env, timeout=300)
    return done


@pytest.fixture
def offline_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAVA_", "HF_")) and k != "SPACE_ID"}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", LLAVA_UI_HOME=os.environ["LLAVA_UI_HOME"])
    return env


def test_a_hub_id_loads_from_the_cache_offline_and_answers_like_the_folder(checkpoints, tmp_path, offline_env):
    folder = checkpoints("lmms")
    snapshot = hub_cache(tmp_path / "hub", "test-org/tiny-llava", folder)
    from_folder = generate(str(folder), offline_env)
    from_hub = generate("hf:test-org/tiny-llava", offline_env)
    assert from_hub.returncode == 0, from_hub.stderr[-2000:]
    assert json.loads(from_hub.stdout.splitlines()[-1])["text"] == json.loads(from_folder.stdout.splitlines()[-1])["text"]
    assert "from the Hugging Face Hub" in from_hub.stderr
    on_a_space = generate("test-org/tiny-llava", {**offline_env, "SPACE_ID": "someone/demo"})  # hf by default there
    assert on_a_space.returncode == 0, on_a_space.stderr[-2000:]
    assert snapshot.exists()


def test_an_uncached_hub_id_offline_is_a_one_line_error_with_the_way_out(tmp_path, offline_env):
    done = generate("hf:test-org/not-cached", offline_env)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "could not download test-org/not-cached from the Hugging Face Hub" in line and "--model /path/to" in line


def test_only_the_files_the_loader_reads_are_asked_for(monkeypatch, tmp_path):
    asked = {}

    def snapshot_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub, "unreachable", lambda url: None)
    assert hub.hf_download("lmms-lab/llava-next-interleave-qwen-0.5b", lambda *a: None) == tmp_path
    from fnmatch import fnmatch

    def wanted(name):
        return any(fnmatch(name, pattern) for pattern in asked["patterns"])

    needed = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
              "vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json"]
    skipped = ["model_state.pdparams", "pytorch_model.bin", "training_args.bin", "trainer_state.json", "README.md",
               "optimizer.pt", "checkpoint-1000/model.safetensors"]
    assert all(wanted(name) for name in needed) and not any(wanted(name) for name in skipped)


def test_which_hub_a_model_id_uses(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert hub.split_model_id("org/model") == ("paddlenlp", "org/model")
    assert hub.split_model_id("hf:org/model") == ("hf", "org/model")
    assert hub.split_model_id("paddlenlp:org/model", "hf") == ("paddlenlp", "org/model")
    assert hub.split_model_id("org/model", "hf") == ("hf", "org/model")
    monkeypatch.setenv("SPACE_ID", "someone/demo")
    assert hub.split_model_id("org/model") == ("hf", "org/model")
    assert hub.model_source("org/model") == "the Hugging Face Hub"


CLOSED = "https://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def paddlenlp_unreachable(monkeypatch, tmp_path):
    """PaddleNLP's storage at a closed local port, and an empty PaddleNLP cache."""
    from llava_ui.model.paddlenlp_lean import paddlenlp_module

    monkeypatch.setattr(paddlenlp_module("paddlenlp.utils.download.bos_download"), "ENDPOINT", CLOSED)
    monkeypatch.setenv("PPNLP_HOME", str(tmp_path / "ppnlp"))
    monkeypatch.delenv("SPACE_ID", raising=False)


def assert_the_way_out(message):
    assert "cannot be reached" in message and "--model /path/to" in message and "--model tiny-random" in message


def test_an_unreachable_host_is_found_within_the_probe_timeout(monkeypatch):
    assert "127.0.0.1:9" in hub.unreachable(CLOSED)
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: time.sleep(30))
    began = time.monotonic()
    assert "did not answer within 1 s" in hub.unreachable("https://example.org", timeout=1)
    assert time.monotonic() - began < 3  # a connection that hangs (a firewall dropping packets)


def test_an_uncached_model_with_the_storage_unreachable_fails_at_once_with_both_hints(paddlenlp_unreachable):
    from llava_ui.checkpoints.load import resolve_model_dir
    from llava_ui.errors import UserError

    with pytest.raises(UserError) as failed:
        resolve_model_dir("lmms-lab/llava-next-interleave-qwen-0.5b", progress=lambda *a, **k: None)
    assert_the_way_out(str(failed.value))


def test_a_cached_model_loads_with_the_storage_unreachable(paddlenlp_unreachable, checkpoints, tmp_path):
    from llava_ui.checkpoints.load import resolve_model_dir

    copy = tmp_path / "ppnlp" / "models" / "test-org" / "tiny"
    shutil.copytree(checkpoints("paddlenlp", vocab="bytes"), copy)
    said = []
    assert resolve_model_dir("test-org/tiny", progress=lambda message, *a, **k: said.append(message)) == copy
    assert "using the cached copy" in said[-1]


def test_an_uncached_hub_id_with_the_hub_unreachable_fails_at_once_with_both_hints(monkeypatch, tmp_path,
                                                                                 checkpoints):
    from huggingface_hub import constants

    from llava_ui.errors import UserError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    with pytest.raises(UserError) as failed:
        hub.hf_download("test-org/not-cached", lambda *a: None)
    assert_the_way_out(str(failed.value))
    snapshot = hub_cache(tmp_path / "hub", "test-org/cached", checkpoints("lmms"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub.hf_download("test-org/cached", lambda *a: None) == snapshot


def test_serve_says_in_the_terminal_and_the_status_bar_that_the_hub_cannot_be_reached(paddlenlp_unreachable,
                                                                                      caplog):
    from llava_ui.engine import Engine
    from llava_ui.web.handlers import ChatHandlers

    engine = Engine("test-org/not-cached", hub="paddlenlp")
    began = time.monotonic()
    engine.load_in_background().join(30)
    assert time.monotonic() - began < 30
    html, button, _ = ChatHandlers(engine).status()
    assert "failed to load" in html and button["value"] == "Retry load"
    assert_the_way_out(html)
    assert_the_way_out(caplog.text)


def test_generate_offline_exits_within_30_seconds_with_both_hints(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAVA_", "HF_")) and k != "SPACE_ID"}
    env.update(PPNLP_ENDPOINT=CLOSED, PPNLP_HOME=str(tmp_path / "ppnlp"), LLAVA_UI_HOME=os.environ["LLAVA_UI_HOME"])
    done = subprocess.run([sys.executable, "-m", "llava_ui", "generate", "--model", "test-org/not-cached",
                           "--prompt", "hi"], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 2
    assert_the_way_out(done.stderr.strip().splitlines()[-1])

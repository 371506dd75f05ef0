"""Model ids from the Hugging Face Hub (`hf:<id>`, `--hub hf`, the default on a Space), read offline from a cache
laid out as huggingface_hub lays it out (models--org--name/refs/main → snapshots/<commit>/, files in blobs/)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

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

"""Where a model id comes from: the Hugging Face Hub (`hf:<id>`, `--hub hf`, the default on a Space) or
PaddleNLP's community storage (`paddlenlp:<id>`, `--hub paddlenlp`, the default elsewhere).

From the Hub only the files the loader reads are downloaded (`allow_patterns`): the config, the safetensors
weights (and their index), the tokenizer and preprocessor files. The cache is huggingface_hub's own
(`HF_HOME`, `HF_HUB_CACHE`; on a Space, persistent storage when `HF_HOME=/data/.huggingface`), and
`HF_HUB_OFFLINE=1` reads it without the network.
"""
from __future__ import annotations

import os
from pathlib import Path

from llava_ui.errors import UserError

HUBS = {"hf": "the Hugging Face Hub", "paddlenlp": "PaddleNLP's community storage"}
HUB_FILES = ["config.json", "generation_config.json", "preprocessor_config.json", "model.safetensors",
             "model.safetensors.index.json", "model-*.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
             "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"]


def default_hub() -> str:
    """hf on a Hugging Face Space (SPACE_ID is set there), else paddlenlp."""
    return "hf" if os.environ.get("SPACE_ID") else "paddlenlp"


def split_model_id(model: str, hub: str | None = None) -> tuple[str, str]:
    """(hub, repo id) of a model id: an `hf:` or `paddlenlp:` prefix wins over `hub`, `hub` over the default."""
    prefix, sep, rest = model.partition(":")
    if sep and prefix in HUBS:
        return prefix, rest
    if hub is not None and hub not in HUBS:
        raise UserError(f"unknown hub {hub!r}: use one of {', '.join(HUBS)}")
    return hub or default_hub(), model


def hf_download(repo_id: str, progress) -> Path:
    """The snapshot folder of `repo_id` in huggingface_hub's cache, downloading what is missing (with its own
    progress bars on stderr)."""
    import huggingface_hub  # deferred: only a Hub model id needs it
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    progress(f"downloading {repo_id} from the Hugging Face Hub (about 1.8 GB on first use, cached in "
             f"{constants.HF_HUB_CACHE}) ...")
    try:
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} is not a model on the Hugging Face Hub (or it is private: set HF_TOKEN)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise UserError(
            f"could not download {repo_id} from the Hugging Face Hub: it is unreachable (offline?) and the model "
            f"is not in the cache [{type(err).__name__}]; pass --model /path/to/a/local/copy of the checkpoint "
            "folder instead (or --model tiny-random for a random-weight test model)") from None
    if not (Path(folder) / "config.json").exists():
        raise UserError(f"{repo_id} on the Hugging Face Hub has no config.json: not a checkpoint this app loads")
    return Path(folder)


def model_source(model: str, hub: str | None = None) -> str:
    """Where `model` is read from, for the status bar: a folder, a model made here, or the hub that serves it."""
    if model == "tiny-random":
        return "a random test model made here"
    if Path(model).expanduser().is_dir():
        return "a local folder"
    source, _ = split_model_id(model, hub)
    return HUBS[source]


def cached_model_dir(model: str) -> Path | None:
    """The folder of `model` when it is already on this machine: a local folder, or a complete copy in either
    hub's cache (huggingface_hub's, or PaddleNLP's `$PPNLP_HOME/models/<id>`); None otherwise. Never downloads."""
    from llava_ui.checkpoints.weights import weight_files

    def complete(folder) -> bool:
        return folder is not None and (Path(folder) / "config.json").exists() and bool(weight_files(Path(folder)))

    path = Path(model).expanduser()
    if path.is_dir():
        return path if complete(path) else None
    _, repo_id = split_model_id(model)
    paddlenlp_copy = Path(os.environ.get("PPNLP_HOME") or "~/.paddlenlp").expanduser() / "models" / repo_id
    if complete(paddlenlp_copy):
        return paddlenlp_copy
    try:
        import huggingface_hub

        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True)
    except Exception:  # not in the cache (LocalEntryNotFoundError), or no usable huggingface_hub
        return None
    return Path(folder) if complete(folder) else None

"""Where a model id comes from: the Hugging Face Hub (`hf:<id>`, `--hub hf`, the default on a Space) or
PaddleNLP's community storage (`paddlenlp:<id>`, `--hub paddlenlp`, the default elsewhere).

From the Hub only the files the loader reads are downloaded (`allow_patterns`): the config, the safetensors
weights (and their index), the tokenizer and preprocessor files. The cache is huggingface_hub's own
(`HF_HOME`, `HF_HUB_CACHE`; on a Space, persistent storage when `HF_HOME=/data/.huggingface`), and
`HF_HUB_OFFLINE=1` reads it without the network.

Before downloading, the hub's host is probed with one TCP connection (`unreachable`): offline or behind a firewall
the download libraries retry for minutes before they give up, and a first run should say at once what to do instead.
"""
from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from llava_ui.errors import UserError

HUBS = {"hf": "the Hugging Face Hub", "paddlenlp": "PaddleNLP's community storage"}
HUB_FILES = ["config.json", "generation_config.json", "preprocessor_config.json", "model.safetensors",
             "model.safetensors.index.json", "model-*.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
             "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"]


PROBE_TIMEOUT_S = 10.0


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


def unreachable(url: str, timeout: float | None = None) -> str | None:
    """Why no TCP connection to `url`'s host (or to the proxy the environment names for it) opened within
    `timeout` seconds (PROBE_TIMEOUT_S); None when one did. Name resolution runs in a thread, as it has no timeout
    of its own."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    outcome = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{host}:{port}: {err.strerror or err or type(err).__name__}")

    thread = threading.Thread(target=connect, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"{host}:{port} did not answer within {timeout:.0f} s"


def unreachable_error(repo_id: str, hub: str, why: str) -> UserError:
    return UserError(
        f"cannot download {repo_id}: {HUBS[hub]} cannot be reached from here ({why}; offline, or behind a firewall?) "
        "and no copy is cached; pass --model /path/to/a/local/copy of the checkpoint folder instead (or --model "
        "tiny-random for a random-weight test model)")


def paddlenlp_copy(repo_id: str) -> Path | None:
    """The complete copy of `repo_id` in PaddleNLP's cache (`$PPNLP_HOME/models/<id>`), or None."""
    folder = Path(os.environ.get("PPNLP_HOME") or "~/.paddlenlp").expanduser() / "models" / repo_id
    return folder if _complete(folder) else None


def _complete(folder) -> bool:
    from llava_ui.checkpoints.weights import weight_files

    return folder is not None and (Path(folder) / "config.json").exists() and bool(weight_files(Path(folder)))


def cached_if_unreachable(endpoint: str, repo_id: str, hub: str, find_copy, place: str, progress) -> Path | None:
    """None when `endpoint` answers; otherwise the complete cached copy of `repo_id` (find_copy(repo_id)), said
    through `progress`, or the UserError that names what to do when there is none."""
    why = unreachable(endpoint)
    if why is None:
        return None
    copy = find_copy(repo_id)
    if copy is None:
        raise unreachable_error(repo_id, hub, why)
    progress(f"{place} cannot be reached ({why}): using the cached copy of {repo_id}")
    return copy


def hf_download(repo_id: str, progress) -> Path:
    """The snapshot folder of `repo_id` in huggingface_hub's cache, downloading what is missing (with its own
    progress bars on stderr). When the Hub cannot be reached, a complete cached copy is used as it is."""
    import huggingface_hub  # deferred: only a Hub model id needs it
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if not constants.HF_HUB_OFFLINE:
        copy = cached_if_unreachable(constants.ENDPOINT, repo_id, "hf", _hf_copy, "the Hugging Face Hub", progress)
        if copy is not None:
            return copy
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
    path = Path(model).expanduser()
    if path.is_dir():
        return path if _complete(path) else None
    _, repo_id = split_model_id(model)
    return paddlenlp_copy(repo_id) or _hf_copy(repo_id)


def _hf_copy(repo_id: str) -> Path | None:
    """The complete copy of `repo_id` in huggingface_hub's cache, or None. Never downloads."""
    try:
        import huggingface_hub

        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True)
    except Exception:  # not in the cache (LocalEntryNotFoundError), or no usable huggingface_hub
        return None
    return Path(folder) if _complete(folder) else None

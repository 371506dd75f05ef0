"""Locate, download and load the three checkpoint layouts of the model into the same Paddle model.

Layouts (README "Pointing it at a checkpoint"): "paddlenlp" (model_state.pdparams, `qwen2.*`, Linear weights [in, out]),
"lmms" (lmms-lab safetensors, `model.*`, PyTorch [out, in]) and "hf" (llava-hf transformers safetensors).
"""
from __future__ import annotations

import ctypes
import json
import re
import sys
from pathlib import Path

import numpy as np
import paddle

from llava_ui.chat.prompt import PromptTokenizer
from llava_ui.checkpoints.hub import cached_if_unreachable, hf_download, paddlenlp_copy, split_model_id
from llava_ui.checkpoints.random import tiny_random_dir
from llava_ui.checkpoints.weights import StoredArray, open_weights, weight_files
from llava_ui.config import read_config
from llava_ui.errors import UserError
from llava_ui.model.cpu import configure_cpu
from llava_ui.model.llava import LlavaQwen
from llava_ui.model.linear import KERNEL_LAYOUTS
from llava_ui.model.paddlenlp_lean import paddlenlp_module

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json",
                   "special_tokens_map.json", "tokenizer.json", "preprocessor_config.json", "generation_config.json")
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "model_state.pdparams.index.json",
                "model_state.pdparams")
TINY_RANDOM = "tiny-random"


def resolve_model_dir(model: str, progress=None, hub: str | None = None) -> Path:
    """A local folder as it is; `tiny-random` made on first use; anything else is a model id, downloaded from
    the Hugging Face Hub or PaddleNLP's community storage (checkpoints/hub.py says which)."""
    progress = progress or _stderr
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model == TINY_RANDOM:
        return tiny_random_dir(progress)
    if path.exists() or model.startswith((".", "/", "~")):
        raise UserError(f"model folder {model} does not exist (or is not a folder)")
    source, repo_id = split_model_id(model, hub)
    return hf_download(repo_id, progress) if source == "hf" else _download(repo_id, progress)


def _download(repo_id: str, progress) -> Path:
    """`repo_id`'s folder in PaddleNLP's cache, downloading what is missing; when the storage cannot be reached,
    a complete cached copy is used as it is."""
    resolve_file_path = paddlenlp_module("paddlenlp.utils.download").resolve_file_path
    copy = cached_if_unreachable(paddlenlp_module("paddlenlp.utils.download.bos_download").ENDPOINT, repo_id,
                                 "paddlenlp", paddlenlp_copy, "PaddleNLP's community storage", progress)
    if copy is not None:
        return copy

    def fetch(names, required=True):
        try:
            return resolve_file_path(repo_id, list(names))
        except Exception as err:  # paddlenlp raises EnvironmentError, requests errors, ValueError, ...
            if not required:
                return None
            raise UserError(
                f"could not download {repo_id}: the model hub is unreachable (offline?) or has no such model "
                f"[{type(err).__name__}]; pass --model /path/to/a/local/copy of the checkpoint folder instead "
                f"(or --model {TINY_RANDOM} for a random-weight test model)"
            ) from None

    progress(f"resolving {repo_id} through paddlenlp's cache (PPNLP_HOME) ...")
    config = fetch(["config.json"])
    if config is None:
        raise UserError(f"{repo_id}: no config.json found on the hub or in the cache; pass --model /path/to/folder")
    progress("downloading weights (about 1.6 GB on first use; cached afterwards) ...")
    weights = fetch(WEIGHT_FILES)
    if weights is None:
        raise UserError(f"{repo_id}: no weights (model_state.pdparams or *.safetensors) found; pass --model /path/to/folder")
    if weights.endswith(".index.json"):
        for shard in sorted(set(json.loads(Path(weights).read_text())["weight_map"].values())):
            fetch([shard])
    for name in TOKENIZER_FILES:
        fetch([name], required=False)
    return Path(config).parent


def detect_layout(model_dir: Path) -> str:
    raw = json.loads((model_dir / "config.json").read_text())
    if raw.get("model_type") == "llava" or "text_config" in raw:
        return "hf"
    files = weight_files(model_dir)
    if not files:
        raise UserError(f"{model_dir} has no model_state.pdparams or *.safetensors weights")
    return "lmms" if files[0].suffix == ".safetensors" else "paddlenlp"


def _rename(key: str, layout: str) -> str | None:
    """Checkpoint key → this project's parameter name (None: a known weight the model does not use)."""
    if layout == "hf":
        key = re.sub(r"^model\.language_model\.", "language_model.model.", key)
        key = re.sub(r"^model\.vision_tower\.", "vision_tower.", key)
        key = re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", key)
        key = re.sub(r"^lm_head\.", "language_model.lm_head.", key)
        key = key.replace("multi_modal_projector.linear_1.", "mm_projector.0.")
        key = key.replace("multi_modal_projector.linear_2.", "mm_projector.2.")
        key = re.sub(r"^language_model\.model\.", "language_model.qwen2.", key)
    else:
        prefix = "qwen2." if layout == "paddlenlp" else "model."
        if key.startswith(prefix + "vision_tower.vision_tower."):
            key = "vision_tower." + key[len(prefix + "vision_tower.vision_tower."):]
        elif key.startswith(prefix + "mm_projector.") or key == prefix + "image_newline":
            key = key[len(prefix):]
        elif key.startswith(prefix):
            key = "language_model.qwen2." + key[len(prefix):]
        elif key.startswith("lm_head."):
            key = "language_model." + key
    if ".post_layernorm." in key or ".vision_model.head." in key or key.endswith("rotary_emb.inv_freq"):
        return None  # LLaVA uses the encoder output as it is: no post-layernorm, no pooling head
    return key


def convert_state(arrays: dict, layout: str, tied: bool) -> dict[str, np.ndarray]:
    """Rename to this model's parameter names and put Linear weights in Paddle's [in, out] order."""
    state = {}
    for key, array in arrays.items():
        name = _rename(key, layout)
        if name is None or (tied and name == "language_model.lm_head.weight"):
            continue  # a tied head is the embedding itself
        if layout != "paddlenlp" and array.ndim == 2 and "embed" not in name:
            array = array.T  # every 2-D weight here but the embeddings is a Linear stored [out, in]
        state[name] = array
    return state


def _beyond_feature_layer(name: str, layers: int) -> bool:
    """Tower layers after the one whose output LLaVA uses are never run (a full 27-layer so400m, feature layer -2)."""
    found = re.match(r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.", name)
    return found is not None and int(found.group(1)) >= layers


def vision_layers_in(state: dict) -> int:
    found = {int(m.group(1)) for k in state if (m := re.search(r"encoder\.layers\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def build_model(model_dir: Path, dtype: str = "float32", progress=None, weight_layout: str = "in-out",
                bf16_vision: bool = False):
    """Read config + weights, build LlavaQwen in `dtype`, load every weight; fail loudly on any mismatch.
    `weight_layout`: how the language model's weights are held (qwen2.Qwen2Runner.pack: "in-out" as stored,
    "out-in" or "packed" for batched decode steps, "bf16" or "int8" for the CPU kernels; options.options picks it).
    `bf16_vision` (with a kernel layout, on a CPU with bf16 units): the vision tower and the projector load first and
    become oneDNN bf16 programs, their fp32 matrices given back (LlavaQwen.use_bf16), before the language model
    loads: the load never holds the fp32 tower, its bf16 copies and the language model at once."""
    no_init_weights = paddlenlp_module("paddlenlp.transformers.model_utils").no_init_weights

    progress = progress or _stderr
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir} has no config.json: not a checkpoint folder")
    layout = detect_layout(model_dir)
    config = read_config(model_dir, layout)
    progress(f"reading {layout} weights from {model_dir} ...")
    try:
        state = convert_state(open_weights(weight_files(model_dir)), layout, config.text["tie_word_embeddings"])
    except Exception as err:
        raise UserError(f"could not read the weights in {model_dir}: {type(err).__name__}: {err}") from None
    if config.vision_layers_from_weights:
        config.vision.num_hidden_layers = vision_layers_in(state)
    state = {k: v for k, v in state.items() if not _beyond_feature_layer(k, config.vision.num_hidden_layers)}
    if not any(k.startswith("vision_tower.") for k in state):
        raise UserError(f"{model_dir} carries no vision tower weights (a separate {config.raw.get('mm_vision_tower')} "
                        "checkpoint is not supported); use a checkpoint that includes them")
    if paddle.get_device() == "cpu":
        progress(f"using {configure_cpu()} CPU threads")
    progress(f"building the model ({dtype}) ...")
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        # parameters get memory only when their weight arrives, and paddlenlp's random init is skipped
        with paddle.LazyGuard(), no_init_weights():
            model = LlavaQwen(config, has_image_newline="image_newline" in state)
    finally:
        paddle.set_default_dtype(previous)
    if bf16_vision and weight_layout not in KERNEL_LAYOUTS:
        raise ValueError("bf16_vision goes with the CPU kernels' weight layouts (bf16, int8)")
    language = _language(model)
    if bf16_vision:
        load_state(model, state, progress, select=lambda name: not language(name))
        model.use_bf16(progress, release_fp32=True)
    if weight_layout in KERNEL_LAYOUTS:
        progress(f"packing the language model's weights in {weight_layout} as they load ...")
    # the language model first, each layer regrouped per CPU worker (and in bf16 packed) as soon as its weights are
    # in: the load never holds the whole language model in fp32 beside anything else
    load_state(model, state, progress, first="language_model.", loaded=_packing(model.runner, weight_layout),
               select=language if bf16_vision else None)
    model.runner.finish_pack(weight_layout)
    model.eval()
    for param in model.parameters():  # no thread can record autograd history on them, whatever its grad mode
        param.stop_gradient = True
    return model, config, layout


def _packing(runner, layout: str):
    """loaded(name) for load_state: packs a language-model layer (Qwen2Runner.pack_layer) once its last weight is in."""
    left: dict[int, int] = {}
    for name, _ in runner.qwen2.named_parameters():
        found = re.match(r"layers\.(\d+)\.", name)
        if found:
            left[int(found.group(1))] = left.get(int(found.group(1)), 0) + 1

    def loaded(name: str) -> None:
        found = re.match(r"language_model\.qwen2\.layers\.(\d+)\.", name)
        if found:
            layer = int(found.group(1))
            left[layer] -= 1
            if left[layer] == 0:
                runner.pack_layer(layer, layout)

    return loaded


def _language(model):
    """name → whether the parameter belongs to the language model (its weights load last with bf16_vision)."""
    return lambda name: name.startswith("language_model.")


def load_state(model, state: dict, progress=None, first: str = "", loaded=None, select=None) -> None:
    """Load numpy arrays or weights.StoredArray into the parameters, one at a time, dropping each from `state`
    once loaded: peak memory is the model plus its largest weight. Parameters named `first`... load first;
    `loaded(name)` hears of each one in. `progress(message, done=, total=)` hears how many weights are in.
    `select(name)`: only those parameters (and their weights in `state`) this time; the rest stay for a later call."""
    params = dict(model.named_parameters())
    chosen = select or (lambda name: True)
    params = {k: v for k, v in params.items() if chosen(k)}
    if first:
        params = {**{k: v for k, v in params.items() if k.startswith(first)}, **params}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(k for k in state if chosen(k) and k not in params)
    if missing or unexpected:
        raise UserError("checkpoint does not fit the model: "
                        + (f"missing {_names(missing)}" if missing else "")
                        + ("; " if missing and unexpected else "")
                        + (f"unexpected {_names(unexpected)}" if unexpected else ""))
    for name, param in params.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise UserError(f"checkpoint weight {name} has shape {list(state[name].shape)}, the model expects "
                            f"{param.shape}")
    in_place = paddle.get_device() == "cpu"
    total = len(params)
    for done, name in enumerate(list(params)):
        param = params.pop(name)  # held here no longer than its load: `loaded` may let it go (pack_layer)
        if progress is not None and done % max(total // 20, 1) == 0:
            progress("loading the weights", done=done, total=total)
        array = state.pop(name)
        if in_place and isinstance(array, StoredArray) and param.dtype == paddle.float32:
            param.set_value(np.empty(array.shape, np.float32))  # untouched pages: memory, no data copied
            array.read_into(_writable_view(param))  # the file's bytes go straight into the parameter
        else:
            param.set_value(rounded(np.ascontiguousarray(array, dtype=np.float32), param.dtype))
        del param, array
        if loaded is not None:
            loaded(name)


def _writable_view(tensor) -> np.ndarray:
    """A numpy array over a CPU tensor's own memory (numpy's dlpack import is read-only)."""
    count = int(tensor.numel())
    memory = (ctypes.c_float * count).from_address(tensor.data_ptr())
    return np.frombuffer(memory, dtype=np.float32).reshape(tensor.shape)


def rounded(array: np.ndarray, dtype) -> np.ndarray:
    """float32 values rounded to a parameter's dtype (to nearest, ties to even), as `set_value` takes them: bf16 as
    its bit patterns in uint16 (numpy has no bf16, and a bf16 parameter refuses float32). Rounded on the host, so
    a GPU never holds a float32 copy of a weight."""
    name = str(dtype).replace("paddle.", "")
    if name != "bfloat16":
        return array.astype(name, copy=False)
    bits = array.view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _stderr(message: str, done: int | None = None, total: int | None = None) -> None:
    if done is None:
        print(message, file=sys.stderr, flush=True)


def load_tokenizer(model_dir):
    """paddlenlp's Qwen2 tokenizer from vocab.json + merges.txt, or its fast twin when only tokenizer.json is there."""
    folder = Path(model_dir)
    has_bpe_files = (folder / "vocab.json").exists() and (folder / "merges.txt").exists()
    if not has_bpe_files and not (folder / "tokenizer.json").exists():
        raise UserError(f"{folder} has no tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    # the Qwen2 classes directly: paddlenlp's AutoTokenizer imports every model's tokenizer (scipy, ...) to choose
    if has_bpe_files:
        tokenizer = paddlenlp_module("paddlenlp.transformers.qwen2.tokenizer").Qwen2Tokenizer
    else:
        tokenizer = paddlenlp_module("paddlenlp.transformers.qwen2.tokenizer_fast").Qwen2TokenizerFast
    return PromptTokenizer(tokenizer.from_pretrained(str(folder)))

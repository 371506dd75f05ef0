"""SigLIP vision encoder in Paddle, named like the checkpoints (`vision_model.encoder.layers.N...`).

Features are the last encoder layer's output: the checkpoints already dropped so400m's 27th layer, and LLaVA
never applies `post_layernorm` or the pooling head, so neither exists here.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from llava_ui.config import VisionConfig
from llava_ui.errors import check_stop
from llava_ui.model.cpu import map_shares
from llava_ui.model.attention import softmax


class SiglipEmbeddings(nn.Layer):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2D(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values.astype(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose([0, 2, 1])  # [N, patches, hidden]
        return patches + self.position_embedding.weight.unsqueeze(0)


class SiglipAttention(nn.Layer):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        """Full attention, image by image, computed transposed: W^T x^T gives each head's q, k, v as contiguous
        [head_dim, L] rows straight from the matmul, so no activation is ever transposed (Paddle's CPU kernels
        copy strided views element by element) and the per-head matmuls only set transpose flags."""
        batch, length, hidden = x.shape
        heads, dim = self.num_heads, self.head_dim
        outs = []
        for n in range(batch):
            q, k, v = (paddle.matmul(proj.weight, x[n], transpose_x=True, transpose_y=True) + proj.bias.unsqueeze(1)
                       for proj in (self.q_proj, self.k_proj, self.v_proj))  # [hidden, L] each
            q, k, v = (q * dim ** -0.5).reshape([heads, dim, length]), k.reshape([heads, dim, length]), \
                v.reshape([heads, dim, length])

            def attend(share):  # one worker's heads: [len(share), L, dim]
                part = slice(share.start, share.stop)
                scores = paddle.matmul(q[part], k[part], transpose_x=True)  # [heads, L, L]
                return paddle.matmul(softmax(scores), v[part], transpose_y=True)

            per_head = [head for part in map_shares(attend, heads) for head in paddle.unbind(part)]
            outs.append(paddle.concat(per_head, axis=-1))
        return self.out_proj(paddle.stack(outs))


class SiglipMLP(nn.Layer):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SiglipEncoderLayer(nn.Layer):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Layer):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.LayerList([SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x, should_stop=None):
        for layer in self.layers:
            check_stop(should_stop)  # one view is seconds of work on a CPU: a stop lands within a layer
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Layer):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)

    def forward(self, pixel_values, should_stop=None):
        return self.encoder(self.embeddings(pixel_values), should_stop)


class SiglipVisionModel(nn.Layer):
    """[N, 3, H, W] pixels -> [N, num_patches, hidden] patch features."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, pixel_values, should_stop=None):
        """`should_stop()` is asked between layers; when it says so, Stopped is raised."""
        return self.vision_model(pixel_values, should_stop)

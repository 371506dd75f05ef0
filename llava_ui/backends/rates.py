"""How long the work before the first token takes on this machine: a FLOP count per stage (from the model's
dimensions) over the rate each stage ran at so far here.

Before anything was measured the rates come from one timed matrix product at load (`calibrate`); every vision
view and prefill chunk then updates its stage's rate. The estimates drive the progress events' `eta_s`, the
"≈ 3 min here" hint next to the chat input and the default video frame count on a CPU.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

FIRST_TOKEN_BUDGET_S = 60.0  # the default frame count on a CPU keeps the first token within about this
MAX_DEFAULT_FRAMES = 16  # the reference default, and the default on a GPU
PRIOR_EFFICIENCY = {"vision": 0.6, "prefill": 0.45}  # share of the calibrated matmul rate each stage reaches
SMOOTHING = 0.5  # weight of the newest measurement


@dataclass
class Workload:
    """FLOPs of each stage, from the checkpoint's dimensions."""

    vision_view: float  # one 384×384 view through SigLIP and the projector
    position: float  # one prompt position through the language model's weights
    attention: float  # × positions attended: one position's attention over one earlier position
    head: float  # the LM head, once per prefill
    tokens_per_frame: int

    @classmethod
    def of(cls, config) -> "Workload":
        v, t = config.vision, config.text
        n, d, m = v.num_patches, v.hidden_size, v.intermediate_size
        vision = v.num_hidden_layers * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d)
        vision += 2 * n * v.num_channels * v.patch_size ** 2 * d
        hidden, layers = t["hidden_size"], t["num_hidden_layers"]
        kv = hidden // t["num_attention_heads"] * (t.get("num_key_value_heads") or t["num_attention_heads"])
        vision += 2 * n * (config.mm_hidden_size * hidden + hidden * hidden)
        position = 2 * layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * t["intermediate_size"])
        return cls(float(vision), float(position), 4.0 * hidden * layers, 2.0 * hidden * t["vocab_size"], n + 1)

    def prefill(self, start: int, length: int) -> float:
        """Positions start..start+length (each attends to every position before it)."""
        return length * self.position + self.attention * (length * start + length * length / 2) + self.head


class Rates:
    """FLOP/s of the vision and prefill stages on this machine, measured as they run."""

    def __init__(self, workload: Workload, matmul_flops: float):
        self.workload = workload
        self.calibrated = matmul_flops
        self.rate = {stage: matmul_flops * share for stage, share in PRIOR_EFFICIENCY.items()}
        self.measured = {stage: 0 for stage in self.rate}
        self._lock = threading.Lock()

    def record(self, stage: str, flops: float, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._lock:
            new = flops / seconds
            first = self.measured[stage] == 0
            self.rate[stage] = new if first else SMOOTHING * new + (1 - SMOOTHING) * self.rate[stage]
            self.measured[stage] += 1

    def seconds(self, views: int = 0, start: int = 0, positions: int = 0) -> float:
        """Time for `views` vision views, then a prefill of `positions` positions after `start` cached ones."""
        vision = views * self.workload.vision_view / self.rate["vision"]
        prefill = self.workload.prefill(start, positions) / self.rate["prefill"] if positions else 0.0
        return vision + prefill

    def frames_within(self, budget_s: float = FIRST_TOKEN_BUDGET_S, text_tokens: int = 64) -> int:
        """The most video frames (1..16) whose first token comes within `budget_s` here."""
        per_frame = self.workload.tokens_per_frame
        fitting = [n for n in range(1, MAX_DEFAULT_FRAMES + 1)
                   if self.seconds(views=n, positions=n * per_frame + text_tokens) <= budget_s]
        return max(fitting, default=1)

    def summary(self) -> dict:
        return {"vision_gflops": round(self.rate["vision"] / 1e9, 1), "prefill_gflops": round(self.rate["prefill"] / 1e9, 1),
                "measured": dict(self.measured)}


def calibrate(dtype: str = "float32", seconds: float = 0.2) -> float:
    """FLOP/s of a SigLIP-sized matrix product on the current device (the rates' starting point)."""
    import paddle  # deferred: the estimate helpers above need no paddle

    a = paddle.randn([729, 1152]).astype(dtype)
    b = paddle.randn([1152, 4304]).astype(dtype)
    paddle.matmul(a, b)
    flops, spent, started = 0.0, 0.0, time.perf_counter()
    while spent < seconds:
        out = paddle.matmul(a, b)
        float(out[0, 0])  # wait for the device
        flops += 2.0 * 729 * 1152 * 4304
        spent = time.perf_counter() - started
    return flops / spent


def human_seconds(seconds: float) -> str:
    """'12 s', 'about 1 min', 'about 3 min'."""
    if seconds < 55:
        return f"{max(1, round(seconds))} s"
    return f"about {max(1, round(seconds / 60))} min"

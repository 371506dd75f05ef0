"""How the engine computes, chosen once at load: the device and precision (device.choose), the language model's
weight layout (which linear kernels its one layer loop runs over) and the batch slots, as one typed EngineOptions."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from llava_ui.errors import UserError
from llava_ui.model import device as devices
from llava_ui.model.device import DevicePolicy

WEIGHTS = ("auto", "int8")  # --weights: as the precision holds them, or int8 per output channel (CPU kernels)


@dataclass(frozen=True)
class EngineOptions:
    """Everything that decides how the engine computes, chosen once at load (`options()`) and read from here
    alone: where and in which precision (the DevicePolicy), how the language model's weights are held, how many
    chats one decode step may carry. status(), the status bar, the inspector and `llava-ui check` report it."""

    policy: DevicePolicy
    layout: str  # the language model's weight layout, one of linear.WEIGHT_LAYOUTS (Qwen2Runner.pack)
    batch_slots: int  # the most chats one batched decode step takes

    @property
    def device(self) -> str:
        return self.policy.device

    @property
    def dtype(self) -> str:
        return self.policy.dtype

    @property
    def on_cpu(self) -> bool:
        return not self.policy.on_gpu

    @property
    def bf16_vision(self) -> bool:
        """oneDNN bf16 programs run the vision tower (a bf16 CPU engine: the language model on the kernels)."""
        return self.on_cpu and self.dtype == "bfloat16"

    @property
    def on_kernels(self) -> bool:
        """Whether the language model runs on the CPU kernels (weights held for them: linear.KERNEL_LAYOUTS)."""
        from llava_ui.model.linear import KERNEL_LAYOUTS  # deferred: kernels.py loads a native library

        return self.layout in KERNEL_LAYOUTS

    @property
    def kv_dtype(self) -> str:
        """The KV cache's dtype: bf16 where the CPU kernels attend, else the weights'."""
        return "bfloat16" if self.on_kernels else self.policy.weights_dtype

    @property
    def weights(self) -> str:
        """The language model's weights in words, e.g. "bf16, packed once for oneDNN"."""
        return {"bf16": "bf16, packed once for oneDNN's matmul",
                "int8": "int8 per output channel (weight-only; bf16 prefill math)",
                "packed": "fp32, packed for MKL's sgemm",
                "out-in": "fp32, stored [out, in] for batched steps"}.get(
            self.layout, f"{devices.short_dtype(self.policy.weights_dtype)} as stored")

    def summary(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "precision": self.policy.precision,
                "reason": self.policy.reason, "weight_layout": self.layout, "weights": self.weights,
                "kv_cache": self.kv_dtype, "batch_slots": self.batch_slots}


def options(device: str | None = None, dtype: str | None = None, batch_slots: int = 8, progress=None,
            bf16_kernel: bool | None = None, weights: str | None = None) -> EngineOptions:
    """The engine's options for a load: the device and precision (choose()), then the weight layout that suits
    them and the batch slots. bf16 on a CPU is the CPU kernels' (the language model packed in bf16 for them): where
    they cannot be built (kernels.available; LLAVA_UI_BF16_KERNEL=off turns them off) a CPU engine computes in
    fp32 and its reason says why, or, with bf16 asked for (`dtype`, `bf16_kernel` True), the load is refused with
    the reason. An fp32 CPU engine that batches decode steps holds them [out, in] (linear.project), or with
    LLAVA_UI_BATCH_LAYOUT=packed packed for MKL's sgemm (packed.py); one stream and a GPU keep them as stored.
    `bf16_kernel` False keeps a CPU engine off the kernels (fp32). `weights` "int8" (--weights) holds the language
    model's weights, the head included, as int8 per output channel for the same kernels: on a CPU that computes in
    bf16 only."""
    from llava_ui.model import kernels, packed  # deferred: both load native libraries

    if batch_slots < 1:
        raise UserError(f"batch slots {batch_slots}: at least 1")
    if weights not in (None, *WEIGHTS):
        raise UserError(f"--weights {weights}: one of {', '.join(WEIGHTS)}")
    policy = devices.choose(device, dtype)
    if weights == "int8":
        return EngineOptions(policy, _int8_layout(policy, kernels, progress, bf16_kernel), batch_slots)
    if not policy.on_gpu and policy.dtype == "bfloat16":
        wanted = kernels.enabled() if bf16_kernel is None else bf16_kernel
        if wanted and kernels.available(progress):
            return EngineOptions(policy, "bf16", batch_slots)
        why = kernels.why_unavailable() if wanted else kernels.TURNED_OFF
        if dtype or bf16_kernel:
            raise UserError(f"bf16 on the CPU runs on the CPU kernels, which {why}: use --dtype float32, or see "
                            "docs/deploy.md (a C++ compiler and the onednn-devel package)")
        policy = replace(policy, dtype="float32", reason=f"{policy.where}; fp32: this CPU has "
                                                         f"{devices.bf16_units()} units, but the bf16 kernels {why}")
    if policy.on_gpu or batch_slots == 1:
        layout = "in-out"
    elif os.environ.get("LLAVA_UI_BATCH_LAYOUT", "") == "packed" and packed.available():
        layout = "packed"
    else:
        layout = "out-in"
    return EngineOptions(policy, layout, batch_slots)


def _int8_layout(policy: DevicePolicy, kernels, progress, bf16_kernel: bool | None) -> str:
    """"int8" where the int8 weights can run (the CPU kernels, with bf16 units for the prefill), else why not."""
    if policy.on_gpu:
        raise UserError("--weights int8 runs on the CPU kernels; on a GPU the weights stay in bf16 or fp16 "
                        "(drop --weights, or use --device cpu)")
    if policy.dtype != "bfloat16":
        raise UserError("--weights int8 computes in bf16 and needs a CPU with AMX or AVX-512 BF16 units"
                        + ("; drop --dtype float32" if devices.bf16_units() else f" ({policy.reason})"))
    if bf16_kernel is False or not kernels.available(progress):
        raise UserError("--weights int8 needs the CPU kernels, which cannot be built on this machine (the log says "
                        "why; LLAVA_UI_BF16_KERNEL=off turns them off)")
    return "int8"

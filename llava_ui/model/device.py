"""Where the model runs and in which precision: decided once, at load, with the reason (`llava-ui check` and the
status bar show both).

A GPU computes in bf16 where the chosen device has it (compute capability 8.0 and later: Ampere, Ada, Hopper), else
in fp16; the model was trained in bf16, whose range fp16 lacks (qwen2.check_finite guards the prefill). A CPU with
bf16 units computes in bf16 where the CPU kernels build (the language model through them, llava_ui.model.kernels;
the vision tower through oneDNN programs, llava_ui.model.bf16), any other CPU in fp32. `options()` adds how the weights are held and the batch slots: one
typed EngineOptions per load.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import paddle

from llava_ui.errors import UserError
from llava_ui.model.cpu import bf16_units

DTYPES = ("float32", "float16", "bfloat16")
WEIGHTS = ("auto", "int8")  # --weights: as the precision holds them, or int8 per output channel (CPU kernels)
BF16_CAPABILITY = (8, 0)  # the first CUDA architecture with bf16 tensor cores (Ampere)
_GPU_NAME = re.compile(r"(gpu|cuda)(?::(\d+))?")


@dataclass(frozen=True)
class DevicePolicy:
    """The device ("cpu" or "gpu:N"), the compute dtype and why they were chosen."""

    device: str
    dtype: str
    reason: str

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("gpu")

    @property
    def weights_dtype(self) -> str:
        """The parameters' dtype as loaded: fp32 on a CPU (the bf16 kernels and programs convert them once, at load)."""
        return self.dtype if self.on_gpu else "float32"

    @property
    def precision(self) -> str:
        return precision_label(self.device, self.dtype)


def device_name(requested: str) -> str:
    """"cpu", or "gpu:N" for gpu, gpu:N, cuda or cuda:N (Paddle's name for a CUDA device is gpu)."""
    name = requested.strip().lower()
    if name == "cpu":
        return "cpu"
    found = _GPU_NAME.fullmatch(name)
    if found is None:
        raise UserError(f"--device {requested}: use cpu, gpu or gpu:N (cuda and cuda:N mean the same)")
    return f"gpu:{int(found.group(2) or 0)}"


def gpu_count() -> int:
    """CUDA devices Paddle can use (0 for a CPU-only build of Paddle)."""
    if not paddle.device.is_compiled_with_cuda():
        return 0
    return paddle.device.cuda.device_count()


def gpu_capability(index: int) -> tuple[int, int]:
    major, minor = paddle.device.cuda.get_device_capability(index)
    return int(major), int(minor)


def gpu_label(index: int) -> str:
    """e.g. "gpu:0 (NVIDIA A10G, compute capability 8.6)"."""
    major, minor = gpu_capability(index)
    return f"gpu:{index} ({paddle.device.cuda.get_device_name(index)}, compute capability {major}.{minor})"


def choose(device: str | None = None, dtype: str | None = None) -> DevicePolicy:
    """The device and dtype for a load: as asked where the machine has them (else a UserError saying why not),
    otherwise the first GPU if Paddle sees one, else the CPU; then the best precision of that very device."""
    if dtype and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    gpus = gpu_count()
    if device:
        chosen, why = device_name(device), "asked for (--device)"
    elif gpus:
        chosen, why = "gpu:0", f"Paddle sees {gpus} GPU{'s' * (gpus > 1)}"
    else:
        chosen, why = "cpu", f"no GPU found ({_no_gpu_cause()})"
    if chosen == "cpu":
        return _cpu(dtype, why)
    index = int(chosen.split(":")[1])
    if gpus == 0:
        raise UserError(f"--device {device}: no GPU found ({_no_gpu_cause()}); use --device cpu")
    if index >= gpus:
        raise UserError(f"--device {device}: this machine has {gpus} GPU{'s' * (gpus > 1)} (gpu:0 to gpu:{gpus - 1})")
    return _gpu(index, dtype, why)


def _no_gpu_cause() -> str:
    if paddle.device.is_compiled_with_cuda():
        return "this Paddle has CUDA but sees no device"
    return "this Paddle is built without CUDA"


def _gpu(index: int, dtype: str | None, why: str) -> DevicePolicy:
    label = gpu_label(index)
    has_bf16 = gpu_capability(index) >= BF16_CAPABILITY
    if dtype == "bfloat16" and not has_bf16:
        raise UserError(f"--dtype bfloat16 needs a GPU of compute capability 8.0 or later (Ampere and newer); "
                        f"{label} has none: use --dtype float16 (or float32)")
    if dtype:
        return DevicePolicy(f"gpu:{index}", dtype, f"{label}, {why}; {dtype} asked for (--dtype)")
    if has_bf16:
        return DevicePolicy(f"gpu:{index}", "bfloat16", f"{label}, {why}; bf16, which this GPU has")
    return DevicePolicy(f"gpu:{index}", "float16", f"{label}, {why}; fp16: this GPU has no bf16 (compute "
                                                   "capability below 8.0)")


def _cpu(dtype: str | None, why: str) -> DevicePolicy:
    units = bf16_units()
    if dtype == "float16":
        raise UserError("--dtype float16 needs a GPU: on the CPU use bfloat16 (with AMX or AVX-512 BF16) or float32")
    if dtype == "bfloat16" and not units:
        raise UserError("--dtype bfloat16 on the CPU needs AMX or AVX-512 BF16 units, and this CPU has neither: "
                        "use --dtype float32")
    if dtype:
        return DevicePolicy("cpu", dtype, f"{why}; {dtype} asked for (--dtype)")
    if units:
        return DevicePolicy("cpu", "bfloat16", f"{why}; bf16 through oneDNN, as this CPU has {units} units")
    return DevicePolicy("cpu", "float32", f"{why}; fp32, as this CPU has no bf16 units")


def precision_label(device: str, dtype: str) -> str:
    """What the status bar and the inspector say about the arithmetic, e.g. "bf16 on oneDNN (AMX)"."""
    if device.startswith("cpu"):
        units = bf16_units()
        if dtype == "bfloat16":
            return f"bf16 on oneDNN ({units})"
        return "fp32" + ("" if units else " (this CPU has no bf16 units)")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32")


@dataclass(frozen=True)
class EngineOptions:
    """Everything that decides how the engine computes, chosen once at load (`options()`) and read from here
    alone: where and in which precision (the DevicePolicy), how the language model's weights are held, how many
    chats one decode step may carry. status(), the status bar, the inspector and `llava-ui check` report it."""

    policy: DevicePolicy
    layout: str  # the language model's weight layout, one of qwen2.WEIGHT_LAYOUTS (Qwen2Runner.pack)
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
        """Whether the language model runs on the CPU kernels (weights held for them: qwen2.KERNEL_LAYOUTS)."""
        from llava_ui.model.qwen2 import KERNEL_LAYOUTS  # deferred: qwen2 loads paddlenlp's model code

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
            self.layout, f"{self.policy.weights_dtype} as stored")

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
    the reason. An fp32 CPU engine that batches decode steps holds them [out, in] (qwen2.project), or with
    LLAVA_UI_BATCH_LAYOUT=packed packed for MKL's sgemm (packed.py); one stream and a GPU keep them as stored.
    `bf16_kernel` False keeps a CPU engine off the kernels (fp32). `weights` "int8" (--weights) holds the language
    model's weights, the head included, as int8 per output channel for the same kernels: on a CPU that computes in
    bf16 only."""
    from llava_ui.model import kernels, packed  # deferred: both load native libraries

    if batch_slots < 1:
        raise UserError(f"batch slots {batch_slots}: at least 1")
    if weights not in (None, *WEIGHTS):
        raise UserError(f"--weights {weights}: one of {', '.join(WEIGHTS)}")
    policy = choose(device, dtype)
    if weights == "int8":
        return EngineOptions(policy, _int8_layout(policy, kernels, progress, bf16_kernel), batch_slots)
    if not policy.on_gpu and policy.dtype == "bfloat16":
        wanted = kernels.enabled() if bf16_kernel is None else bf16_kernel
        if wanted and kernels.available(progress):
            return EngineOptions(policy, "bf16", batch_slots)
        why = kernels.why_unavailable() if wanted else "are turned off (LLAVA_UI_BF16_KERNEL=off)"
        if dtype or bf16_kernel:
            raise UserError(f"bf16 on the CPU runs on the CPU kernels, which {why}: use --dtype float32, or see "
                            "docs/deploy.md (a C++ compiler and the onednn-devel package)")
        policy = DevicePolicy("cpu", "float32", f"{policy.reason.split(';')[0]}; fp32: this CPU has "
                                                f"{bf16_units()} units, but the bf16 kernels {why}")
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
                        + ("; drop --dtype float32" if bf16_units() else f" ({policy.reason})"))
    if bf16_kernel is False or not kernels.available(progress):
        raise UserError("--weights int8 needs the CPU kernels, which cannot be built on this machine (the log says "
                        "why; LLAVA_UI_BF16_KERNEL=off turns them off)")
    return "int8"

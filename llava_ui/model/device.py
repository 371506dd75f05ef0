"""Where the model runs and in which precision: decided once, at load, with the reason (`llava-ui check` and the
status bar show both).

A GPU computes in bf16 where the chosen device has it (compute capability 8.0 and later: Ampere, Ada, Hopper), else
in fp16; the model was trained in bf16, whose range fp16 lacks (qwen2.check_finite guards the prefill). A CPU with
bf16 units computes in bf16 where the CPU kernels build (the language model through them, llava_ui.model.kernels;
the vision tower through oneDNN programs, llava_ui.model.bf16), any other CPU in fp32. llava_ui.model.options adds how
the weights are held and the batch slots: one typed EngineOptions per load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import paddle

from llava_ui.errors import UserError
from llava_ui.model.cpu import bf16_units

DTYPES = ("float32", "float16", "bfloat16")
BF16_CAPABILITY = (8, 0)  # the first CUDA architecture with bf16 tensor cores (Ampere)
_GPU_NAME = re.compile(r"(gpu|cuda)(?::(\d+))?")


@dataclass(frozen=True)
class DevicePolicy:
    """The device ("cpu" or "gpu:N"), the compute dtype and why they were chosen (`where`: why this device)."""

    device: str
    dtype: str
    reason: str
    where: str = ""

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
        return DevicePolicy("cpu", dtype, f"{why}; {dtype} asked for (--dtype)", why)
    if units:
        return DevicePolicy("cpu", "bfloat16", f"{why}; bf16 through oneDNN, as this CPU has {units} units", why)
    return DevicePolicy("cpu", "float32", f"{why}; fp32, as this CPU has no bf16 units", why)


def precision_label(device: str, dtype: str) -> str:
    """What the status bar and the inspector say about the arithmetic, e.g. "bf16 on oneDNN (AMX)"."""
    if device.startswith("cpu"):
        units = bf16_units()
        if dtype == "bfloat16":
            return f"bf16 on oneDNN ({units})"
        return "fp32" + ("" if units else " (this CPU has no bf16 units)")
    return short_dtype(dtype)


def short_dtype(dtype: str) -> str:
    """"bf16", "fp16" or "fp32" for a dtype's name."""
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32")

"""What the CPU running the tests can do, for tests whose code branches on it.

A branch taken only where the CPU has a feature (AVX-512, bf16 units) is tested on both sides where both can run:
the plain side is forced on a CPU that has the feature, and the feature's side is skipped, with its reason shown,
only where the CPU lacks it. docs/limits.md lists these tests and which side each kind of CPU runs.
"""
import pytest

from llava_ui.model.cpu import bf16_units, has_avx512

needs_avx512 = pytest.mark.skipif(not has_avx512(), reason="this CPU has no AVX-512 (Paddle's fused kernels need it)")
needs_bf16_units = pytest.mark.skipif(bf16_units() is None, reason="this CPU has no AMX / AVX-512 BF16 units")


def machine_precisions() -> list[str]:
    """The CPU precisions an engine can be built in here: float32 everywhere, bfloat16 where bf16 units are."""
    return ["float32"] + (["bfloat16"] if bf16_units() else [])


def machine_engines() -> list:
    """Engine options for each path this CPU can run, named: fp32 everywhere; where bf16 units are, bf16 through
    the bf16 kernels, bf16 through oneDNN programs (the path where the kernels cannot be built) and int8 weights
    through the kernels (--weights int8)."""
    paths = [pytest.param({"dtype": "float32"}, id="fp32")]
    if bf16_units():
        paths += [pytest.param({"dtype": "bfloat16", "bf16_kernel": True}, id="bf16-kernel"),
                  pytest.param({"dtype": "bfloat16", "bf16_kernel": False}, id="bf16-programs"),
                  pytest.param({"dtype": "bfloat16", "bf16_kernel": True, "weights": "int8"}, id="int8-kernel")]
    return paths

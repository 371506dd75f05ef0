"""What the CPU running the tests can do, for tests whose code branches on it.

A branch taken only where the CPU has a feature (AVX-512, bf16 units) is tested on both sides where both can run:
the plain side is forced on a CPU that has the feature, and the feature's side is skipped, with its reason shown,
only where the CPU lacks it. docs/limits.md lists these tests and which side each kind of CPU runs.
"""
import pytest

from llava_ui.model.cpu import bf16_units, has_avx512

needs_avx512 = pytest.mark.skipif(not has_avx512(), reason="this CPU has no AVX-512 (Paddle's fused kernels need it)")
needs_bf16_units = pytest.mark.skipif(bf16_units() is None, reason="this CPU has no AMX / AVX-512 BF16 units")


def machine_engines() -> list:
    """Engine options for each path this CPU can run, named: fp32 everywhere; where bf16 units are, bf16 and int8
    weights (--weights int8) through the CPU kernels (kernels_or_skip: where those cannot be built, a bf16 CPU
    engine computes in fp32)."""
    paths = [pytest.param({"dtype": "float32"}, id="fp32")]
    if bf16_units():
        paths += [pytest.param({"dtype": "bfloat16", "bf16_kernel": True}, id="bf16-kernel"),
                  pytest.param({"dtype": "bfloat16", "bf16_kernel": True, "weights": "int8"}, id="int8-kernel")]
    return paths


def kernels_or_skip(engine_options: dict) -> None:
    """Skip, with the reason, an engine of these options that needs the CPU kernels where they cannot be built."""
    from llava_ui.model import kernels

    if engine_options.get("dtype") == "bfloat16" and not kernels.available():
        pytest.skip(f"the CPU kernels {kernels.why_unavailable()}")

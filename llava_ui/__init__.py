"""Chat with, demo and inspect LLaVA-NeXT-Interleave (Qwen1.5-0.5B + SigLIP) on PaddlePaddle."""

__version__ = "0.2.0"
DEFAULT_MODEL = "lmms-lab/llava-next-interleave-qwen-0.5b"

"""The model in Paddle: SigLIP, the projector and Qwen2 (LLaVA-NeXT's llava_arch.py), image processing, the decode
loop and the CPU setup. Imports chat/ (markers, media) and nothing above."""

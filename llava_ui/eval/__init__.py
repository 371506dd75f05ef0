"""The model card's evaluation: the benchmark runner, its scoring and the answerers on a backend."""

"""The inspector's arrays of an exported conversation, kept in a compressed .npz beside its JSON: per answered turn,
the attention rows over each image ([tokens, layers, visual positions], float32) and the images' effect on each
token's log-probability. The JSON names the file and each turn's keys; replay compares what it computes again."""
from __future__ import annotations

from pathlib import Path

import numpy as np

ATTENTION_TOLERANCE = 1e-3  # largest weight difference (weights are in [0, 1]) that still counts as the same
EFFECT_TOLERANCE = 1e-2  # largest log-probability difference that still counts as the same


def turn_arrays(turn: int, record) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays to save, their keys for the turn's JSON output) of one answer's Result."""
    arrays, keys = {}, {}
    if record is not None and record.attention is not None:
        keys["attention"] = []
        for k, per_image in enumerate(attention_by_image(record.attention)):
            name = f"turn{turn}.attention.image{k}"
            arrays[name] = per_image
            keys["attention"].append(name)
    if record is not None and record.image_effect is not None:
        keys["image_effect"] = f"turn{turn}.image_effect"
        arrays[keys["image_effect"]] = np.asarray(record.image_effect, dtype=np.float32)
    return arrays, keys


def attention_by_image(attention: list) -> list[np.ndarray]:
    """Result.attention ([token][layer][image] → weights) as one [tokens, layers, positions] array per image."""
    if not attention or not attention[0] or not attention[0][0]:
        return []
    return [np.asarray([[layer[k] for layer in token] for token in attention], dtype=np.float32)
            for k in range(len(attention[0][0]))]


def save(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def load(json_path: str | Path, export: dict) -> dict[str, np.ndarray] | None:
    """The arrays file an export names, read from beside its JSON (None when it names none or it is missing)."""
    name = export.get("arrays")
    path = Path(json_path).with_name(name) if name else None
    if path is None or not path.exists():
        return None
    with np.load(path) as stored:
        return {key: stored[key] for key in stored.files}


def compare(keys: dict, arrays: dict[str, np.ndarray], replayed) -> list[str]:
    """Lines saying how far the replayed answer's arrays are from the recorded ones (over the tokens both have)."""
    lines = []
    if keys.get("attention") is not None and replayed.attention is not None:
        now = attention_by_image(replayed.attention)
        pairs = [(arrays[name], fresh) for name, fresh in zip(keys["attention"], now)]
        if len(pairs) != len(keys["attention"]) or not pairs:
            lines.append("attention: the replayed answer saw other images; not compared")
        else:
            tokens = min(min(len(old), len(new)) for old, new in pairs)
            worst = max(float(np.abs(old[:tokens] - new[:tokens]).max()) if tokens else 0.0 for old, new in pairs)
            lines.append(f"attention: {tokens} tokens x {pairs[0][0].shape[1]} layers x {len(pairs)} images compared, "
                         f"largest weight difference {worst:.2e} ({_verdict(worst, ATTENTION_TOLERANCE)})")
    if keys.get("image_effect") is not None and replayed.image_effect is not None:
        old, new = arrays[keys["image_effect"]], np.asarray(replayed.image_effect, dtype=np.float32)
        tokens = min(len(old), len(new))
        worst = float(np.abs(old[:tokens] - new[:tokens]).max()) if tokens else 0.0
        lines.append(f"image effect: {tokens} tokens compared, largest log-probability difference {worst:.2e} "
                     f"({_verdict(worst, EFFECT_TOLERANCE)})")
    return lines


def within(lines: list[str]) -> bool:
    return not any("beyond the tolerance" in line for line in lines)


def _verdict(worst: float, tolerance: float) -> str:
    return f"within the tolerance {tolerance:g}" if worst <= tolerance else f"beyond the tolerance {tolerance:g}"

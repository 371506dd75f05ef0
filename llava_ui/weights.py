"""Read weight files into {name: numpy array} without a deep-learning framework's help.

safetensors are memory-mapped and parsed here so bf16 tensors (which numpy cannot name) load too; a
`.pdparams` file is a pickle and is only ever read from the configured model source.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Arrays are views into a read-only memory map: loading copies them once, straight into the model."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (header_len,) = struct.unpack("<Q", mapped[:8])
    header = json.loads(mapped[8 : 8 + header_len])
    base = 8 + header_len
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = np.frombuffer(mapped, dtype=_SAFETENSORS_DTYPES[info["dtype"]], count=(end - begin) // np.dtype(
            _SAFETENSORS_DTYPES[info["dtype"]]).itemsize, offset=base + begin).reshape(info["shape"])
        arrays[name] = bf16_to_float32(raw) if info["dtype"] == "BF16" else raw
    return arrays


def read_pdparams(path: Path) -> dict[str, np.ndarray]:
    import paddle

    state = paddle.load(str(path), return_numpy=True)
    # paddle pickles bf16 as uint16 bit patterns; no weight of this model is an integer
    return {k: bf16_to_float32(v) if v.dtype == np.uint16 else np.asarray(v) for k, v in state.items()}


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred over the pickle when both exist."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = sorted(model_dir.glob("*.safetensors"))
    if single:
        return single
    pd_index = model_dir / "model_state.pdparams.index.json"
    if pd_index.exists():
        shards = sorted(set(json.loads(pd_index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    return [p for p in [model_dir / "model_state.pdparams"] if p.exists()]


def read_weights(files: list[Path]) -> dict[str, np.ndarray]:
    arrays = {}
    for path in files:
        arrays.update(read_safetensors(path) if path.suffix == ".safetensors" else read_pdparams(path))
    return arrays


def write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Float32 safetensors writer, for the random test checkpoints."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, array in arrays.items():
        data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for data in blobs:
            f.write(data)

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
    if path.stat().st_size < 8:
        raise ValueError(f"{path.name} is truncated ({path.stat().st_size} bytes)")
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


class StoredArray:
    """A weight in a file, read as float32 only when loaded; `.T` is a lazy transpose. Loading one weight at a
    time straight into the model's memory keeps a load at one copy of the weights (mmap pages read by a copy
    would count in RSS too)."""

    def __init__(self, shape, fill, transposed: bool = False):
        self.shape, self._fill, self.transposed = tuple(shape), fill, transposed

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def T(self) -> "StoredArray":
        return StoredArray(self.shape[::-1], self._fill, not self.transposed)

    def read_into(self, out: np.ndarray) -> None:
        """Fill a C-contiguous float32 array of this shape."""
        if not self.transposed:
            self._fill(out)
            return
        stored = np.empty(self.shape[::-1], np.float32)
        self._fill(stored)
        out[...] = stored.T

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, np.float32)
        self.read_into(out)
        return out if dtype is None else out.astype(dtype, copy=False)


def open_safetensors(path: Path) -> dict[str, StoredArray]:
    """Every tensor of a safetensors file as a StoredArray (only the header is read now)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len

    def filler(info):
        begin, end = info["data_offsets"]
        stored = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])

        def fill(out: np.ndarray) -> None:
            with open(path, "rb", buffering=0) as f:
                f.seek(base + begin)
                if info["dtype"] == "F32":
                    _read_exactly(f, memoryview(out).cast("B"), end - begin)
                    return
                raw = np.empty(info["shape"], stored)
                _read_exactly(f, memoryview(raw).cast("B"), end - begin)
                out[...] = bf16_to_float32(raw) if info["dtype"] == "BF16" else raw

        return fill

    return {name: StoredArray(info["shape"], filler(info)) for name, info in header.items() if name != "__metadata__"}


def _read_exactly(f, target: memoryview, size: int) -> None:
    done = 0
    while done < size:
        got = f.readinto(target[done:])
        if not got:
            raise EOFError(f"{f.name} ends early")
        done += got


def open_weights(files: list[Path]) -> dict[str, StoredArray]:
    """Like read_weights, but nothing is read until a StoredArray is loaded. A .pdparams pickle is read whole
    (as stored: bf16 stays 2 bytes a weight until loaded); drop each StoredArray once loaded to free it."""
    stored = {}
    for path in files:
        if path.suffix == ".safetensors":
            stored.update(open_safetensors(path))
        else:
            import paddle  # deferred: safetensors checkpoints are read (and tests written) without Paddle

            for name, array in paddle.load(str(path), return_numpy=True).items():
                stored[name] = StoredArray(np.shape(array), lambda out, a=array: _copy_widened(out, np.asarray(a)))
    return stored


def _copy_widened(out: np.ndarray, array: np.ndarray) -> None:
    # paddle pickles bf16 as uint16 bit patterns; no weight of this model is an integer
    out[...] = bf16_to_float32(array) if array.dtype == np.uint16 else array


def read_pdparams(path: Path) -> dict[str, np.ndarray]:
    import paddle  # deferred: as above

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

"""Safetensors files: positioned block reads, sharded writes, atomic directory replace.

The on-disk side of checkpoints, with no knowledge of our model: `SafetensorsFile` reads
rectangular blocks without a memory map, `plan_shards` / `write_shards` write a
(possibly sharded) set of files with its index, and `replace_dir` swaps a finished temporary
directory into place so that a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                      "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
READ_CHUNK_BYTES = 4 * 1024**2  # column blocks are gathered from row chunks of this size


class SafetensorsFile:
    """Reads rectangular blocks of the tensors of one .safetensors file with positioned reads.

    Why not `safe_open`: it memory-maps the file, and every page a read touches stays in this
    process's resident memory until the map is closed — loading a model through it costs the
    file's size in RSS on top of the loaded parameters.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            (n,) = np.frombuffer(self._file.read(8), "<u8")
            header = json.loads(self._file.read(int(n)))
        except (ValueError, json.JSONDecodeError) as e:
            self._file.close()
            raise ValueError(f"{self.path} is not a valid safetensors file ({e}); re-download or "
                             "re-save the checkpoint") from None
        header.pop("__metadata__", None)
        start = 8 + int(n)
        self.tensors = {}
        for name, h in header.items():
            if h["dtype"] not in SAFETENSORS_DTYPES:
                self._file.close()
                raise ValueError(f"tensor {name} in {self.path} has dtype {h['dtype']}, which "
                                 f"is not read; supported: {sorted(SAFETENSORS_DTYPES)}")
            self.tensors[name] = (np.dtype(SAFETENSORS_DTYPES[h["dtype"]]), tuple(h["shape"]),
                                  start + h["data_offsets"][0])

    def close(self):
        self._file.close()

    def shape(self, name) -> tuple:
        return self.tensors[name][1]

    def read(self, name, ranges=None) -> np.ndarray:
        """The block [a0:b0, a1:b1, ...] of tensor `name` (`ranges` [(a, b)] per dim; None:
        all of it). Only the rows of the block are read, in chunks, so the transient memory
        is the block plus at most READ_CHUNK_BYTES."""
        dtype, shape, offset = self.tensors[name]
        ranges = [(0, n) for n in shape] if ranges is None else list(ranges)
        out = np.empty(tuple(b - a for a, b in ranges), dtype)
        if out.size == 0:
            return out
        if not shape:
            self._readinto(out, offset)
            return out
        row = math.prod(shape[1:]) * dtype.itemsize
        (r0, r1), rest = ranges[0], ranges[1:]
        if all((a, b) == (0, n) for (a, b), n in zip(rest, shape[1:])):  # whole rows
            self._readinto(out, offset + r0 * row)
            return out
        cols = (slice(None),) + tuple(slice(a, b) for a, b in rest)
        step = max(1, READ_CHUNK_BYTES // max(row, 1))
        for r in range(r0, r1, step):
            n = min(step, r1 - r)
            chunk = np.empty((n,) + shape[1:], dtype)
            self._readinto(chunk, offset + r * row)
            out[r - r0:r - r0 + n] = chunk[cols]
        return out

    def _readinto(self, out: np.ndarray, offset: int):
        buf = out.reshape(-1).view(np.uint8)
        self._file.seek(offset)
        if self._file.readinto(buf) != buf.size:
            raise ValueError(f"{self.path} ends early (truncated download?); re-download the "
                             "checkpoint")


def flat_range(shape: tuple, ranges: list) -> tuple | None:
    """The block `ranges` of an array of `shape` as one range of its flattened index, or None
    when the block is not contiguous once flattened."""
    partial = [i for i, ((a, b), n) in enumerate(zip(ranges, shape)) if (a, b) != (0, n)]
    if not partial:
        return 0, math.prod(shape)
    k = partial[0]
    if len(partial) > 1 or math.prod(shape[:k]) != 1:
        return None
    inner = math.prod(shape[k + 1:])
    return ranges[k][0] * inner, ranges[k][1] * inner


def tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise FileNotFoundError(f"{index} lists files that are missing: {missing}; "
                                    "copy the complete checkpoint")
        return {name: path / f for name, f in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; save the model with "
            "safe_serialization=True (PyTorch .bin checkpoints are not read)")
    return {name: single for name in SafetensorsFile(single).tensors}


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards, current, used = [], [], 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    return shards + [current]


def shard_file_name(k: int, n: int) -> str:
    """The HF file name of shard k (0-based) of n."""
    return SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_shards(directory: Path, shards: list[list[str]], tensors_for, total_size: int, *,
                 write: bool = True) -> dict[str, str]:
    """Writes each shard's tensors (`tensors_for(names)` -> {name: array}, called for every
    shard even when `write` is False: in a multi-process save the gathers are collective)
    into `directory`, plus the index when there is more than one shard. Returns the
    weight map {tensor name: file name}. The one shard writer (HF export and GGUF import)."""
    weight_map = {}
    for k, names in enumerate(shards):
        fname = shard_file_name(k, len(shards))
        tensors = tensors_for(names)
        if write:
            save_file(tensors, directory / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del tensors
    if write and len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return weight_map


def fsync_files(directory: Path):
    """Every file of `directory` on disk: done before a rename makes the directory visible."""
    for f in directory.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def replace_dir(tmp: Path, path: Path):
    """Moves the finished `tmp` to `path`; an existing `path` is swapped out, then deleted."""
    fsync_files(tmp)
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)

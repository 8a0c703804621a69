"""Hugging Face checkpoints <-> our NNX model.

Loading reads, for each tensor, only the block each local device holds (plain positioned
reads of the safetensors file, no memory map), converts it to our layout and puts it on that
device before reading the next: the host holds the model once (on CPU devices) or not at all
(on accelerators), plus one shard in flight. Saving writes into a temporary sibling
directory and renames it into place, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill import sharding as sharding_lib
from jdistill.checkpoints import resolve
from jdistill.checkpoints import safetensors as sft
from jdistill.checkpoints.safetensors import SafetensorsFile
from jdistill.models import config as config_lib
from jdistill.models.decoder import Decoder, abstract_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
# HF checkpoints of older transformers carry these non-parameter buffers.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Leaves that are linear maps: how many leading axes of our layout are the input side.
LINEAR_INPUT_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1,
                     "up_proj": 1, "down_proj": 1, "lm_head": 1}


def resolve_dtype(dtype):
    """None, a name ('float32', 'bfloat16', 'float16') or a jnp dtype -> jnp dtype or None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def hf_name(path: tuple) -> str:
    """Our state path (e.g. ('layers', 0, 'self_attn', 'q_bias')) -> HF tensor name."""
    *parents, leaf = path
    suffix = "weight"
    if leaf.endswith("_bias"):
        leaf, suffix = leaf[: -len("_bias")] + "_proj", "bias"
    prefix = [] if leaf == "lm_head" else ["model"]
    return ".".join(map(str, [*prefix, *parents, leaf, suffix]))


def to_ours(hf_array: np.ndarray, leaf: str, shape: tuple) -> np.ndarray:
    """HF layout ([out, in] Linear weights, flat head dims) -> our layout `shape`."""
    if leaf in LINEAR_INPUT_AXES:
        return hf_array.T.reshape(shape)
    return hf_array.reshape(shape)


def hf_shape(shape: tuple, leaf: str) -> tuple:
    """The HF tensor shape of one of our parameters."""
    if leaf in LINEAR_INPUT_AXES:
        n_in = LINEAR_INPUT_AXES[leaf]
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if leaf.endswith("_bias"):
        return (math.prod(shape),)
    return tuple(shape)


def to_hf(array: np.ndarray, leaf: str) -> np.ndarray:
    """Our layout -> HF layout (inverse of `to_ours`)."""
    if leaf in LINEAR_INPUT_AXES:
        n_in = LINEAR_INPUT_AXES[leaf]
        rows = math.prod(array.shape[:n_in])
        return np.ascontiguousarray(array.reshape(rows, -1).T)
    if leaf.endswith("_bias"):
        return array.reshape(-1)
    return array


def param_paths(state) -> list[tuple[tuple, jax.ShapeDtypeStruct]]:
    """[(path, leaf)] over an nnx.State, path as a tuple of str/int names."""
    return [(sharding_lib.path_names(p), leaf)
            for p, leaf in jax.tree_util.tree_leaves_with_path(state)]


def load_pretrained(path, *, dtype=None, mesh=None) -> Decoder:
    """Loads a local HF checkpoint directory into a `Decoder` (with `.config`).

    Args:
      path: directory with config.json and model.safetensors, or sharded
        model-0000x-of-0000y.safetensors files with model.safetensors.index.json; or a
        llama.cpp `.gguf` file (Llama family), converted once into an HF directory under
        $JDISTILL_CACHE/gguf (default ~/.cache/jdistill/gguf) and loaded from there.
      dtype: parameter dtype ('float32', 'bfloat16', 'float16'); None keeps the stored dtype.
      mesh: a `jax.sharding.Mesh`; each tensor is placed straight into its sharding from
        `sharding.RULES`. None places everything on the default device.
    """
    path = resolve(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist; pass a local "
                                "directory holding config.json and *.safetensors")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; pass the directory that "
                                "save_pretrained wrote (config.json + *.safetensors)")
    dtype = resolve_dtype(dtype)
    config = config_lib.load_hf_config(path / "config.json")
    files = sft.tensor_files(path)
    names = {n for n in files if not n.endswith(IGNORED_SUFFIXES)}

    abstract = abstract_model(config)
    graphdef, abstract_state = nnx.split(abstract)
    entries = param_paths(abstract_state)
    expected = {hf_name(p) for p, _ in entries}
    if config.tie_word_embeddings:
        names.discard("lm_head.weight")  # some exporters write the tied copy too
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors that config.json implies: "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; does config.json "
                         "belong to these weights?")
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors config.json does not describe: "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; does "
                         "config.json belong to these weights?")

    shardings = sharding_lib.param_shardings(abstract_state, mesh) if mesh is not None else None
    readers = {}
    try:
        leaves = []
        for i, (p, leaf) in enumerate(entries):
            name = hf_name(p)
            f = files[name]
            if f not in readers:
                readers[f] = SafetensorsFile(f)
            leaves.append(_read_param(readers[f], name, p[-1], leaf.shape, dtype,
                                      None if shardings is None else shardings[i]))
    finally:
        for r in readers.values():
            r.close()
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_state), leaves)
    model = nnx.merge(graphdef, state)
    model.source_path = str(path)
    return model


def _read_block(reader: SafetensorsFile, name: str, leaf: str, shape: tuple, index) -> np.ndarray:
    """Block `index` (a tuple of slices in our layout) of one parameter, reading only what
    it needs where the HF layout allows (every split the sharding rules make)."""
    ranges = [s.indices(n)[:2] for s, n in zip(index, shape)]
    sizes = tuple(b - a for a, b in ranges)
    if leaf in LINEAR_INPUT_AXES:  # HF [out, in] with flattened groups
        n_in = LINEAR_INPUT_AXES[leaf]
        r_in = sft.flat_range(shape[:n_in], ranges[:n_in])
        r_out = sft.flat_range(shape[n_in:], ranges[n_in:])
        if r_in is not None and r_out is not None:
            return reader.read(name, [r_out, r_in]).T.reshape(sizes)
    elif leaf.endswith("_bias"):
        r = sft.flat_range(shape, ranges)
        if r is not None:
            return reader.read(name, [r]).reshape(sizes)
    else:
        return reader.read(name, ranges)
    return np.ascontiguousarray(to_ours(reader.read(name), leaf, shape)[tuple(index)])


def _read_param(reader: SafetensorsFile, name, leaf, shape, dtype, sharding):
    ours_shape = tuple(shape)
    want = hf_shape(ours_shape, leaf)
    stored = reader.shape(name)
    if tuple(stored) != want:
        raise ValueError(f"tensor {name} has shape {tuple(stored)} but config.json implies "
                         f"{want}; does config.json belong to these weights?")
    dtype = dtype if dtype is not None else _jnp_dtype(reader.tensors[name][0])
    if sharding is None:
        return jnp.asarray(to_ours(reader.read(name), leaf, ours_shape).astype(dtype, copy=False))
    # one block at a time straight onto its device(s): devices holding the same block (a
    # replicated dimension) share one read
    by_block = {}
    for device, index in sharding.addressable_devices_indices_map(ours_shape).items():
        key = tuple(s.indices(n)[:2] for s, n in zip(index, ours_shape))
        by_block.setdefault(key, (index, []))[1].append(device)
    arrays = {}
    for index, devices in by_block.values():
        block = _read_block(reader, name, leaf, ours_shape, index).astype(dtype, copy=False)
        for d in devices:
            arrays[d] = jax.device_put(block, d)
        jax.block_until_ready([arrays[d] for d in devices])  # the copy is done: drop the block
        del block
    ordered = [arrays[d] for d in sharding.addressable_devices_indices_map(ours_shape)]
    return jax.make_array_from_single_device_arrays(ours_shape, sharding, ordered)


def _jnp_dtype(np_dtype):
    name = np.dtype(np_dtype).name
    if name not in DTYPES:
        raise ValueError(f"checkpoint tensor dtype {name} is not supported; pass dtype= one of "
                         f"{sorted(DTYPES)}")
    return DTYPES[name]


def save_pretrained(model: Decoder, path, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Writes config.json + safetensors that `transformers` loads, atomically.

    Tensors are gathered one at a time; files above `max_shard_bytes` are split into
    model-0000x-of-0000y.safetensors with an index. Tokenizer and generation files are
    copied from the directory the model was loaded from, when present. In a multi-process
    run every process must call this (gathers are collective); only process 0 writes.
    """
    path = Path(path)
    state = nnx.state(model, nnx.Param)
    entries = param_paths(state)
    shards = sft.plan_shards([(hf_name(p), leaf.nbytes) for p, leaf in entries], max_shard_bytes)
    writer = jax.process_index() == 0
    tmp = None
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        by_name = {hf_name(p): (p[-1], leaf) for p, leaf in entries}
        total = sum(leaf.nbytes for _, leaf in entries)
        sft.write_shards(
            tmp, shards, lambda names: {n: to_hf(sharding_lib.to_host(by_name[n][1]), by_name[n][0])
                                        for n in names}, total, write=writer)
        if writer:
            _write_metadata(model, tmp, state)
            sft.replace_dir(tmp, path)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_metadata(model, directory: Path, state):
    dtype = jnp.dtype(jax.tree_util.tree_leaves(state)[0].dtype).name
    cfg = config_lib.to_hf_dict(model.config, dtype=dtype)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    source = getattr(model, "source_path", None)
    if source and Path(source).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).exists():
                shutil.copy2(Path(source) / name, directory / name)

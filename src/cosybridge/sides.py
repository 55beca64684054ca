"""Any supported checkpoint seen the way CosyVoice uses it: `verify`'s two sides, from headers and JSON.

A Side names, for every weight CosyVoice reads, where its rows are in this checkpoint, under the llm.pt
name (`speech_embedding.weight` is rows off..off+S of the merged embed_tokens, all of a vLLM export's
embed_tokens, …), and checks the key set strictly before any model is built. No model code here.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

from .errors import CheckpointError
from .families import FAMILIES, PT_BACKBONE_PREFIX, SPEECH_TOKEN_SIZE, Family, TokenLayout
from .hfdir import read_hf_dir
from .io.dtypes import FLOAT_DTYPES
from .io.sharded import HFWeights
from .keyset import KeyReport, compare_keys, expected_pt_shapes, hf_key_report
from .modeldir import BLANKEN, LLM_PT, read_json, read_model_dir
from .plan import DECODER_B, DECODER_W, HF_BIAS, HF_EMBED, HF_HEAD, LLM_EMB, PT_EMBED, PT_HEAD, SPEECH_EMB
from .values import compare_rows
from .vllm_export import SOURCE_KEY

FORMAT_NAMES = {"pt": "CosyVoice llm.pt", "hf": "merged Hugging Face dir", "vllm": "speech-only vLLM export"}
# config entries that decide what the backbone computes (transformers' Qwen2Config)
BACKBONE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
                 "use_sliding_window", "sliding_window", "max_window_layers")
SHAPE_KEYS = BACKBONE_KEYS[:5]


def not_cosyvoice(why: str) -> CheckpointError:
    return CheckpointError(f"not a CosyVoice LLM checkpoint: {why}")


def detect(path: str) -> str:
    """"model_dir", "pt" (a .pt file), "hf" or "vllm", from file names and config.json alone."""
    path = str(path)
    if os.path.isfile(path):
        if path.endswith((".safetensors", ".json")):
            raise not_cosyvoice(f"{path} is one file of a Hugging Face directory; pass the directory that holds it")
        return "pt"
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.exists(os.path.join(path, LLM_PT)) or any(os.path.exists(os.path.join(path, f.yaml_name))
                                                          for f in FAMILIES.values()):
        return "model_dir"
    if not os.path.exists(os.path.join(path, "config.json")):
        raise not_cosyvoice(f"{path} has no {LLM_PT}, no cosyvoice2/3.yaml and no config.json")
    config = read_json(os.path.join(path, "config.json"))
    # the speech-only export: embedding rows = speech rows (CosyVoice's own export records nothing else)
    if SOURCE_KEY in config or config.get("vocab_size") in {f.speech_rows() for f in FAMILIES.values()}:
        return "vllm"
    return "hf"


def family_tokenizer(blanken: str, family: Family):
    """BlankEN + the family's special tokens (tokens.py's recipe), built once per BlankEN content: building it
    from vocab.json and merges.txt takes most of a second. Its length is the id of <|s_0|>."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(os.listdir(blanken)):
        if os.path.isfile(os.path.join(blanken, name)) and name != "config.json":
            with open(os.path.join(blanken, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return _family_tokenizer(h.hexdigest(), blanken, family.name)


@functools.lru_cache(maxsize=8)
def _family_tokenizer(digest: str, blanken: str, family: str):
    from .tokens import family_tokenizer

    return family_tokenizer(blanken, FAMILIES[family])


@dataclass
class Side:
    label: str
    path: str
    kind: str                      # "pt", "hf" or "vllm"
    family: Family
    speech_token_size: int
    config: dict                   # the Qwen2 config the backbone is built from
    source: object                 # PtFile or HFWeights
    rows: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # llm.pt name → (tensor, start, stop)
    keys: KeyReport = field(default_factory=KeyReport)
    problems: list[str] = field(default_factory=list)
    text_offset: int | None = None  # <|s_0|>: token ids below it are text ids
    layout: TokenLayout | None = None
    tokenizer: object = None        # tokenizers.Tokenizer, for the fixed text's ids
    config_dir: str = ""            # where transformers reads config.json (BlankEN for llm.pt)

    @property
    def speech_rows(self) -> int:
        return self.family.speech_rows(self.speech_token_size)

    @property
    def dtypes(self) -> list[str]:
        return sorted({self.source.info(t).dtype for t, _, _ in self.rows.values()})

    def summary(self) -> dict:
        return {"path": os.path.abspath(self.path), "format": self.kind, "format_name": FORMAT_NAMES[self.kind],
                "family": self.family.name, "dtypes": self.dtypes}

    def close(self) -> None:
        self.source.close()


def open_side(path: str, label: str) -> Side:
    kind = detect(path)
    if kind in ("pt", "model_dir"):
        return _pt_side(str(path), label)
    return _hf_side(str(path), label) if kind == "hf" else _vllm_side(str(path), label)


def _backbone_rows(infos: dict, prefix: str, embed: str, head: str) -> dict:
    return {PT_BACKBONE_PREFIX + n[len(prefix):]: (n, 0, i.rows) for n, i in infos.items()
            if n.startswith(prefix + "model.") and n not in (embed, head)}


def _pt_side(path: str, label: str) -> Side:
    from .io.pt_io import PtFile
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        md = read_model_dir(folder)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: verify needs the CosyVoice model directory around llm.pt (the yaml names "
                              f"the class, {BLANKEN}/config.json the backbone): {e}") from None
    pt = PtFile(md.llm_pt if os.path.isdir(path) else path)
    infos = {n: pt.info(n) for n in pt.names()}
    fam, size = md.family, md.llm.speech_token_size
    side = Side(label, path, "pt", fam, size, md.qwen_config, pt, config_dir=md.blanken)
    side.keys = compare_keys({n: i.shape for n, i in infos.items()}, expected_pt_shapes(fam, md.qwen_config, size))
    side.tokenizer = family_tokenizer(md.blanken, fam)
    side.text_offset = side.tokenizer.get_vocab_size(with_added_tokens=True)
    side.rows = _backbone_rows(infos, PT_BACKBONE_PREFIX, PT_EMBED, PT_HEAD)
    if PT_EMBED in infos:
        side.rows[PT_EMBED] = (PT_EMBED, 0, min(side.text_offset, infos[PT_EMBED].rows))
    for name in (SPEECH_EMB, DECODER_W, DECODER_B, LLM_EMB):
        if name in infos:
            side.rows[name] = (name, 0, infos[name].rows)
    return side


def _hf_keys(side: Side, infos: dict, config: dict) -> None:
    """transformers' strict Qwen2 key set for config.json (lm_head.bias aside: only CosyVoice reads it)."""
    side.keys = hf_key_report(side.path, config, infos)


def _hf_side(path: str, label: str) -> Side:
    hd = read_hf_dir(path)
    weights = HFWeights(path)
    infos = {n: weights.info(n) for n in weights.names()}
    side = Side(label, path, "hf", hd.family, hd.speech_token_size, hd.config, weights, config_dir=path)
    _hf_keys(side, infos, hd.config)
    layout = side.layout = hd.layout(hd.recorded_base_rows()[0] or 0)
    off, S = layout.speech_offset, layout.speech_rows
    side.text_offset = off
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        side.tokenizer = _tokenizer_file(os.path.join(path, "tokenizer.json"))
    side.rows = _backbone_rows(infos, "", HF_EMBED, HF_HEAD)
    rows = infos[HF_EMBED].rows if HF_EMBED in infos else 0
    if rows < layout.tokenizer_len:
        side.problems.append(f"{HF_EMBED} has {rows} rows but the tokenizer has {layout.tokenizer_len} tokens")
        return side
    head = HF_HEAD if HF_HEAD in infos else HF_EMBED
    side.rows.update({PT_EMBED: (HF_EMBED, 0, off), SPEECH_EMB: (HF_EMBED, off, off + S),
                      DECODER_W: (head, off, off + S)})
    if HF_BIAS in infos and hd.family.decoder_bias:
        side.rows[DECODER_B] = (HF_BIAS, off, off + S)
    if hd.family.llm_embedding_rows:
        side.rows[LLM_EMB] = (HF_EMBED, off + S, off + S + hd.family.llm_embedding_rows)
    return side


def _tokenizer_file(path: str):
    """tokenizer.json, parsed once per file version (12 MB of JSON: most of a second)."""
    st = os.stat(path)
    return _tokenizer_cached(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _tokenizer_cached(path: str, mtime_ns: int, size: int):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def _vllm_side(path: str, label: str) -> Side:
    config = read_json(os.path.join(path, "config.json"))
    weights = HFWeights(path)
    infos = {n: weights.info(n) for n in weights.names()}
    rows = infos[HF_EMBED].rows if HF_EMBED in infos else None
    fams = [f for f in FAMILIES.values() if f.speech_rows() == rows]
    if not fams:
        weights.close()
        raise CheckpointError(f"{path}: a speech-only export with {rows} embedding rows, which is neither "
                              + " nor ".join(f"{f.name} ({f.speech_rows()})" for f in FAMILIES.values()))
    fam = fams[0]
    side = Side(label, path, "vllm", fam, SPEECH_TOKEN_SIZE, config, weights, config_dir=path)
    _hf_keys(side, infos, config)
    side.rows = _backbone_rows(infos, "", HF_EMBED, HF_HEAD)
    side.rows.update({SPEECH_EMB: (HF_EMBED, 0, rows), DECODER_W: (HF_HEAD if HF_HEAD in infos else HF_EMBED, 0, rows)})
    if HF_BIAS in infos and fam.decoder_bias:
        side.rows[DECODER_B] = (HF_BIAS, 0, rows)
    return side


def config_differences(a: Side, b: Side) -> list[dict]:
    out = []
    for key in BACKBONE_KEYS:
        va, vb = a.config.get(key), b.config.get(key)
        if va != vb and not (key == "head_dim" and None in (va, vb)):
            out.append({"key": key, "a": va, "b": vb})
    return out


def shape_differences(diffs: list[dict]) -> list[dict]:
    return [d for d in diffs if d["key"] in SHAPE_KEYS]


def lowest_precision(dtypes: list[str]) -> str:
    """The dtype both sides are compared in: the lowest precision present (F16 vs BF16: neither holds the other)."""
    floats = [d for d in dtypes if d in FLOAT_DTYPES]
    if not floats:
        return "F32"
    low = {"F16", "BF16"} & set(floats)
    if len(low) == 2:
        return "F32"
    return next(iter(low)) if low else ("F32" if "F32" in floats else "F64")


def compare_weights(a: Side, b: Side) -> dict:
    """Every tensor CosyVoice reads, row for row, in the lower precision of the two sides."""
    dtype = lowest_precision(a.dtypes + b.dtypes)
    exact = dtype != "F32" or {"F16", "BF16"}.isdisjoint(a.dtypes + b.dtypes)
    out = {"compared": 0, "dtype": dtype, "exact": exact, "differing": [],
           "only_in_a": sorted(set(a.rows) - set(b.rows) - _not_held(b)),
           "only_in_b": sorted(set(b.rows) - set(a.rows) - _not_held(a))}
    for name in a.rows:
        if name not in b.rows:
            continue
        (ta, sa, ea), (tb, sb, eb) = a.rows[name], b.rows[name]
        shape_a, shape_b = (ea - sa, *a.source.info(ta).shape[1:]), (eb - sb, *b.source.info(tb).shape[1:])
        if shape_a != shape_b:
            out["differing"].append({"name": name, "rows_differing": None, "first_row": None, "max_abs_diff": None,
                                     "shapes": [list(shape_a), list(shape_b)]})
            continue
        diff = compare_rows(a.source, ta, b.source, tb, dtype=dtype, a_start=sa, b_start=sb, rows=ea - sa)
        out["compared"] += 1
        if diff["rows_differing"]:
            out["differing"].append({"name": name, **diff, "shapes": None})
    return out


def _not_held(side: Side) -> set[str]:
    """Rows a side cannot hold by design: a vLLM export has no text embedding and no llm_embedding."""
    return {PT_EMBED, LLM_EMB} if side.kind == "vllm" else set()

"""The `inspect` report: a plain dict with stable keys (the --json output, documented in the README), and the
helpers every format fills it with: warnings with codes, tensor groups, token ids, the inf/NaN scan."""
from __future__ import annotations

import os

from .families import Family, TokenLayout
from .plan import HF_BIAS
from .values import count_nonfinite

FORMATS = {
    "model_dir": "CosyVoice model directory",
    "llm_pt": "CosyVoice llm.pt",
    "training_checkpoint": "training checkpoint (llm.pt with training entries)",
    "hf": "merged Hugging Face directory",
    "vllm": "speech-only vLLM export",
}
DIMS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
TOKEN_KEYS = ("speech_token_offset", "sos_id", "task_id_id", "eos_id", "eos_ids", "tokenizer_len", "vocab_size",
              "padding_rows", "base_vocab_size")


def new_report(path: str, fmt: str, written_by: str, fam: Family, size: int) -> dict:
    return {"path": os.path.abspath(path), "format": fmt, "format_name": FORMATS[fmt], "written_by": written_by,
            "family": fam.name, "lm_class": fam.lm_class, "sharded": False, "backbone": dict.fromkeys(DIMS),
            "speech_token_size": size, "speech_rows": fam.speech_rows(size),
            "speech_ids": speech_ids(fam, size), "tokens": dict.fromkeys(TOKEN_KEYS),
            "lm_head_bias": False, "tied_embeddings": None, "groups": {}, "total_bytes": 0,
            "nonfinite": {"checked": False, "tensors": {}, "masked_bias_entries": None},
            "training": None, "vllm_export": None, "warnings": [], "notes": []}


def speech_ids(fam: Family, size: int) -> dict:
    """Ids in the speech vocabulary (llm_decoder rows); CosyVoice2's sos/task_id are llm_embedding rows: null."""
    def speech(where):
        return size + where[1] if where[0] == "speech" else None
    stops = fam.stop_ids(size)
    return {"eos": speech(fam.eos), "stop_first": stops[0], "stop_last": stops[-1],
            "sos": speech(fam.sos), "task_id": speech(fam.task_id)}


def warn(report: dict, code: str, message: str) -> None:
    report["warnings"].append({"code": code, "message": message})


def token_ids(layout: TokenLayout, vocab_rows: int | None = None) -> dict:
    d = {**layout.as_dict(), "vocab_size": vocab_rows if vocab_rows is not None else layout.vocab_size}
    d["padding_rows"] = d["vocab_size"] - layout.tokenizer_len
    return {k: d[k] for k in TOKEN_KEYS}


GROUP_ORDER = ("embed_tokens", "backbone", "lm_head", "speech_embedding", "llm_decoder", "llm_embedding",
               "sidecar", "other")


def add_groups(report: dict, infos: dict, classify, shared: frozenset = frozenset()) -> None:
    """Tensors, dtypes and bytes per group; `shared` tensors (a tied lm_head saved once) add no bytes."""
    groups = report["groups"]
    for name, info in infos.items():
        g = groups.setdefault(classify(name), {"tensors": 0, "dtypes": [], "bytes": 0})
        g["tensors"] += 1
        size = 0 if name in shared else info.nbytes
        g["bytes"] += size
        report["total_bytes"] += size
        if info.dtype not in g["dtypes"]:
            g["dtypes"] = sorted(g["dtypes"] + [info.dtype])
    report["groups"] = {k: groups[k] for k in GROUP_ORDER if k in groups}


def shapes_warning(report: dict, where: str, keys) -> None:
    if not keys.ok:
        warn(report, "shape_mismatch", f"{where}: " + "; ".join(keys.lines(6)))


def scan_nonfinite(report: dict, source, names, bias_speech_rows: tuple[int, int] | None = None) -> None:
    """Count inf/NaN per tensor. The only ones expected: the -inf text mask of a merged lm_head.bias."""
    counts = {}
    for name in names:
        if name == HF_BIAS and bias_speech_rows:
            import torch

            bias = source.read(name)
            a, b = bias_speech_rows
            inside = int((~torch.isfinite(bias[a:b])).sum())
            outside = torch.cat([bias[:a], bias[b:]])
            report["nonfinite"]["masked_bias_entries"] = int((outside == float("-inf")).sum())
            n = inside + int((torch.isnan(outside) | (outside == float("inf"))).sum())
        else:
            n = count_nonfinite(source, name)
        if n:
            counts[name] = n
    report["nonfinite"].update(checked=True, tensors=counts)
    if counts:
        listed = ", ".join(f"{k} ({v})" for k, v in sorted(counts.items())[:6])
        warn(report, "nonfinite", f"inf/NaN values where none are expected: {listed}; CosyVoice will produce "
                                  "noise or NaN from this checkpoint: use an earlier training checkpoint")

"""A merged Hugging Face directory: config, tokenizer ids, our metadata and sidecar, read from JSON and headers."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from .errors import CheckpointError
from .families import FAMILIES, QWEN2_EMBED_ROWS, Family, TokenLayout
from .modeldir import read_json

SIDECAR = "cosybridge_sidecar.safetensors"
META_KEY = "cosyvoice"                 # our layout record inside config.json
CV3_METADATA = "cosyvoice3_metadata.json"  # written by upstream's TRT-LLM script, and by us


@dataclass
class HFDir:
    path: str
    config: dict
    token_ids: dict[str, int]
    family: Family
    speech_offset: int
    speech_token_size: int
    meta: dict                 # config.json's "cosyvoice" record, {} for upstream-made checkpoints
    sidecar: str | None        # path of our sidecar, if present

    def layout(self, base_rows: int) -> TokenLayout:
        return TokenLayout(self.family, self.speech_offset, base_rows, self.speech_token_size)

    def recorded_base_rows(self) -> tuple[int | None, str]:
        if isinstance(self.meta.get("base_vocab_size"), int):
            return self.meta["base_vocab_size"], "config.json"
        return None, ""


def read_hf_dir(path: str, family: str | None = None) -> HFDir:
    from .tokens import read_token_ids, speech_layout_from_ids

    path = str(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model directory)")
    config = read_json(os.path.join(path, "config.json")) if os.path.exists(os.path.join(path, "config.json")) else None
    if config is None:
        raise CheckpointError(f"{path}: no config.json; not a Hugging Face model directory")
    ids = read_token_ids(path)
    try:
        fam, offset, size = speech_layout_from_ids(ids, FAMILIES[family] if family else None)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}; use the tokenizer files saved with these weights") from None
    meta = config.get(META_KEY) if isinstance(config.get(META_KEY), dict) else {}
    if meta:
        recorded = (meta.get("family"), meta.get("speech_token_offset"))
        if recorded != (fam.name, offset):
            raise CheckpointError(f"{path}/config.json records {recorded[0]} with <|s_0|> at {recorded[1]}, "
                                  f"but the tokenizer says {fam.name} at {offset}")
    cv3 = os.path.join(path, CV3_METADATA)
    if os.path.exists(cv3):
        m = read_json(cv3)
        if fam.name != "cosyvoice3" or m.get("speech_token_offset", offset) != offset:
            raise CheckpointError(f"{cv3}: speech_token_offset {m.get('speech_token_offset')} disagrees with the "
                                  f"tokenizer ({fam.name}, <|s_0|> at {offset})")
    sidecar = os.path.join(path, SIDECAR)
    return HFDir(path, config, ids, fam, offset, size, meta, sidecar if os.path.exists(sidecar) else None)


def default_base_rows() -> tuple[int, str]:
    return QWEN2_EMBED_ROWS, f"the Qwen2.5 default ({QWEN2_EMBED_ROWS}); pass --base MODEL_DIR to read it from the original"


def fingerprint(source, names=None) -> str:
    """A cheap content fingerprint: names, dtypes, shapes, and the first and last row of every tensor.
    Training changes (nearly) every tensor, so this tells weights apart without reading a gigabyte."""
    h = hashlib.sha256()
    for name in sorted(names if names is not None else source.names()):
        info = source.info(name)
        h.update(json.dumps([name, info.dtype, list(info.shape)]).encode())
        rows = info.shape[0] if info.shape else 1
        if rows and (not info.shape or all(info.shape)):
            for a in sorted({0, rows - 1}):
                h.update(source.read(name, a, a + 1).contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:32]

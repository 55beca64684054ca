"""Synthetic CosyVoice model directories with the real layout: for the demo, the tests and the benchmark.

Weights are random but distinct per tensor (seeded by name), so a swapped or mis-sliced tensor shows up
as wrong numbers; they are generated and written in chunks, so a full-size 1.5B model fits in little memory.
The tokenizer is a CosyVoice-BlankEN-style one built from the real Qwen2 vocabulary.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

from .families import FAMILIES, QWEN2_EMBED_ROWS, SPEECH_TOKEN_SIZE
from .io.dtypes import to_torch
from .keyset import expected_pt_shapes
from .modeldir import BLANKEN, LLM_PT


@dataclass(frozen=True)
class Dims:
    hidden: int = 32
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 64
    vocab_rows: int = QWEN2_EMBED_ROWS

    def qwen_config(self) -> dict:
        """A Qwen2 config.json as CosyVoice-BlankEN ships it, with these dims."""
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab_rows,
            "max_position_embeddings": 32768, "max_window_layers": self.layers, "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-06, "hidden_act": "silu", "initializer_range": 0.02,
            "attention_dropout": 0.0, "use_cache": True, "use_sliding_window": False, "sliding_window": 32768,
            "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151643,
            "torch_dtype": "bfloat16",
        }


TINY = Dims()
QWEN25_05B = Dims(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864)
QWEN25_15B = Dims(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960)

_YAML = """\
# CosyVoice {family} model configuration (synthetic, LLM part as upstream writes it)
__set_seed1: !apply:random.seed [1986]
sample_rate: 24000
llm_input_size: {hidden}
llm_output_size: {hidden}
qwen_pretrain_path: ''

llm: !new:cosyvoice.llm.llm.{lm_class}
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {speech_token_size}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1
"""


def native_key_order(family, shapes: dict) -> list[str]:
    """The order Qwen2LM.state_dict() gives: llm_embedding, the backbone, llm_decoder, speech_embedding."""
    head = [k for k in ("llm_embedding.weight",) if k in shapes]
    tail = [k for k in ("llm_decoder.weight", "llm_decoder.bias", "speech_embedding.weight") if k in shapes]
    return head + [k for k in shapes if k.startswith("llm.")] + tail


def _values(name: str, shape: tuple, dtype, start: int, stop: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()) + start)
    rows = (stop - start, *shape[1:]) if shape else ()
    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(rows, generator=g)).to(dtype)
    return (0.05 * torch.randn(rows, generator=g)).to(dtype)


def write_llm_pt(path: str, family, dims: Dims, *, dtype: str = "F32", seed: int = 0, tied: bool = True,
                 speech_token_size: int = SPEECH_TOKEN_SIZE, chunk_rows: int = 16384) -> dict:
    """Stream a synthetic llm.pt; returns name → shape."""
    from .io.pt_io import write_pt

    shapes = expected_pt_shapes(family, dims.qwen_config(), speech_token_size)
    order = native_key_order(family, shapes)
    head = "llm.model.lm_head.weight"
    entries = [(n, dtype, shapes[n], "llm.model.model.embed_tokens.weight" if (tied and n == head) else None)
               for n in order]
    tdtype = to_torch(dtype)

    def chunks(name):
        shape = shapes[name]
        rows = shape[0] if shape else 1
        for a in range(0, rows, chunk_rows):
            yield _values(name, shape, tdtype, a, min(a + chunk_rows, rows), seed)

    with open(path, "wb") as f:
        write_pt(f, entries, chunks)
    return shapes


def build_model_dir(path: str, family: str = "cosyvoice2", dims: Dims = TINY, *, dtype: str = "F32",
                    seed: int = 0, tied: bool = True, speech_token_size: int = SPEECH_TOKEN_SIZE) -> str:
    """A CosyVoice model directory: llm.pt, <family>.yaml, CosyVoice-BlankEN/ (config + real Qwen2 vocabulary)."""
    from .qwen_vocab import write_blanken_tokenizer

    fam = FAMILIES[family]
    os.makedirs(os.path.join(path, BLANKEN), exist_ok=True)
    with open(os.path.join(path, BLANKEN, "config.json"), "w") as f:
        json.dump(dims.qwen_config(), f, indent=2)
    write_blanken_tokenizer(os.path.join(path, BLANKEN))
    with open(os.path.join(path, fam.yaml_name), "w") as f:
        f.write(_YAML.format(family=fam.name, hidden=dims.hidden, lm_class=fam.lm_class,
                             speech_token_size=speech_token_size))
    write_llm_pt(os.path.join(path, LLM_PT), fam, dims, dtype=dtype, seed=seed, tied=tied,
                 speech_token_size=speech_token_size)
    return path

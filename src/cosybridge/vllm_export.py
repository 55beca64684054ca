"""The speech-only Hugging Face export CosyVoice hands to vLLM (its `export_cosyvoice2_vllm`).

embed_tokens = speech_embedding, lm_head = llm_decoder (+ bias), vocab_size = speech rows, no tokenizer.
CosyVoice writes it once into <model_dir>/vllm and reuses it forever; we record the source llm.pt's
fingerprint so `inspect` can tell when the export no longer matches the llm.pt beside it.
"""
from __future__ import annotations

import os
import time

from .convert import (Report, NoProgress, note, plan_bytes, report_nonfinite, target_dtype, write_json,
                      read_native, write_hf_weights)
from .hfdir import fingerprint
from .io.atomic import atomic_dir, check_output
from .io.dtypes import torch_name
from .io.sharded import parse_size
from .numerics import NonFiniteCheck
from .plan import DECODER_B, plan_to_vllm

SOURCE_KEY = "cosybridge_source"
# CosyVoice renames the architecture when lm_head has a bias (vLLM's Qwen2 has none): its own vLLM model class
BIAS_ARCHITECTURE = "CosyVoice2ForCausalLM"


def vllm_config(qwen: dict, speech_rows: int, dtype: str, bias: bool, source: dict) -> dict:
    config = {k: v for k, v in qwen.items()
              if k not in ("_name_or_path", "transformers_version", "bos_token_id", "eos_token_id")}
    config.update({
        "architectures": [BIAS_ARCHITECTURE if bias else "Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": speech_rows, "tie_word_embeddings": False, "use_bias": bias,
        "torch_dtype": torch_name(dtype), SOURCE_KEY: source,
    })
    return config


def to_vllm(model_dir: str, out_dir: str | None = None, *, dtype: str = "bf16", family: str = "auto",
            max_shard_size: str | int = "5GB", force: bool = False, progress=None, strict: bool = False) -> Report:
    """CosyVoice model dir → speech-only export (default: <model_dir>/vllm, where CosyVoice looks)."""
    t0 = time.perf_counter()
    progress = progress or NoProgress()
    target = target_dtype(dtype)
    out_dir = out_dir or os.path.join(model_dir, "vllm")
    shard_limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    md, pt, infos = read_native(model_dir, family)
    with pt:
        check_output(out_dir, md.inputs, force)
        report = Report("to-vllm", model_dir, out_dir, md.family.name)
        for n in pt.notes:
            note(report, f"{md.llm_pt}: {n}")
        plan = plan_to_vllm(infos, dtype=target)
        source = {"llm_pt": os.path.abspath(md.llm_pt), "fingerprint": fingerprint(pt)}
        progress.start(plan_bytes(plan))
        rows = infos["speech_embedding.weight"].rows
        check = NonFiniteCheck(strict)
        with atomic_dir(out_dir) as tmp:
            report.bytes = write_hf_weights(tmp, plan, pt, progress, shard_limit, check)
            write_json(os.path.join(tmp, "config.json"),
                        vllm_config(md.qwen_config, rows, plan.tensors[0].dtype, DECODER_B in infos, source))
            # CosyVoice deletes eos from the generation config: it stops on its own stop ids
            write_json(os.path.join(tmp, "generation_config.json"), {"do_sample": True, **md.family.generation})
        report.tensors = len(plan.tensors)
        report.layout = {"family": md.family.name, "speech_rows": rows, "fingerprint": source["fingerprint"]}
    report_nonfinite(report, check)
    progress.close()
    report.seconds = time.perf_counter() - t0
    return report

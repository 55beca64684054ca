"""The conversions: read headers, plan, validate, then stream one tensor at a time into an atomic output."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

from .errors import CheckpointError
from .families import FAMILIES, Family, TokenLayout
from .hfdir import CV3_METADATA, META_KEY, SIDECAR, default_base_rows, fingerprint, read_hf_dir
from .io.atomic import atomic_dir, atomic_file, check_output
from .io.dtypes import CLI_DTYPES, describe_cast, torch_name
from .io.pt_io import PtFile, write_pt
from .io.safetensors_io import SafetensorsFile, write_safetensors
from .io.sharded import INDEX, HFWeights, parse_size, plan_shards
from .io.source import CombinedSource
from .keyset import compare_keys, expected_pt_shapes
from .modeldir import read_model_dir
from .numerics import NonFiniteCheck
from .plan import DECODER_B, PT_EMBED, PT_HEAD, Plan, plan_to_hf, plan_to_pt
from .stream import one_thread, tensor_chunks

log = logging.getLogger(__name__)


@dataclass
class Report:
    direction: str
    source: str
    output: str
    family: str
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    layout: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    nonfinite: dict = field(default_factory=dict)   # output tensor → unexpected NaN/Inf counts

    def summary(self) -> str:
        mb = self.bytes / 1e6
        rate = mb / self.seconds if self.seconds else 0.0
        return (f"{self.direction} {self.family}: {self.tensors} tensors, {mb:,.1f} MB in {self.seconds:.2f} s "
                f"({rate:,.0f} MB/s) → {self.output}")


class NoProgress:
    def start(self, total: int) -> None: ...
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def target_dtype(dtype: str) -> str | None:
    if dtype in (None, "keep"):
        return None
    if dtype not in CLI_DTYPES:
        raise CheckpointError(f"unknown --dtype {dtype!r}; use keep, bf16, fp16 or fp32")
    return CLI_DTYPES[dtype]


def note(report: Report, msg: str) -> None:
    report.notes.append(msg)
    log.info(msg)


def log_casts(report: Report, plan: Plan, infos: dict, target: str | None) -> None:
    if target is None:
        return
    casts: dict[str, int] = {}
    for t in plan.tensors:
        for p in t.pieces:
            src = getattr(p, "source", None)
            if src in infos and infos[src].dtype != t.dtype:
                casts[infos[src].dtype] = casts.get(infos[src].dtype, 0) + 1
                break
    for src, n in sorted(casts.items()):
        note(report, f"--dtype: {n} tensors cast {describe_cast(src, target)}")


def plan_chunks(source, plan: Plan, progress, check=None):
    by_name = {t.name: t for t in plan.tensors}

    def chunks(name):
        out = by_name[name]
        for chunk in tensor_chunks(source, out):
            progress.update(chunk.numel() * chunk.element_size())
            if check is not None:
                check.chunk(out, chunk)
            yield chunk
        if check is not None:
            check.done(out)  # under --strict this raises while the output is still a temporary file
    return chunks


def report_nonfinite(report: Report, check) -> None:
    line = check.summary()
    if line:
        report.nonfinite = check.as_dict()
        report.notes.append(line)
        log.warning(line)


def plan_bytes(plan: Plan) -> int:
    from .io.dtypes import nbytes
    return sum(nbytes(t.dtype, t.shape) for t in plan.tensors if t.alias_of is None)


# ---- llm.pt → Hugging Face ---------------------------------------------------------------------------

def read_native(model_dir: str, family: str = "auto"):
    """Open a CosyVoice model directory's llm.pt and check it against the yaml and BlankEN config."""
    md = read_model_dir(model_dir)
    if family not in ("auto", md.family.name):
        raise CheckpointError(f"{md.yaml_path} is {md.family.name}, but --family {family} was given")
    pt = PtFile(md.llm_pt)
    infos = {n: pt.info(n) for n in pt.names()}
    report = compare_keys({n: i.shape for n, i in infos.items()},
                          expected_pt_shapes(md.family, md.qwen_config, md.llm.speech_token_size))
    if not report.ok:
        other = [f for f in FAMILIES.values() if f is not md.family and compare_keys(
            {n: i.shape for n, i in infos.items()},
            expected_pt_shapes(f, md.qwen_config, md.llm.speech_token_size)).ok]
        hint = (f"; llm.pt is a {other[0].name} checkpoint but {os.path.basename(md.yaml_path)} names "
                f"{md.llm.lm_class}" if other else "")
        pt.close()
        fix = (f"use the {other[0].yaml_name} that came with this llm.pt" if other else
               "use the yaml and CosyVoice-BlankEN/ that came with this llm.pt")
        raise CheckpointError(f"{md.llm_pt} does not match {os.path.basename(md.yaml_path)} + "
                              f"CosyVoice-BlankEN/config.json{hint} ({'; '.join(report.lines(4))}); {fix}")
    return md, pt, infos


def lm_head_tied(pt: PtFile) -> bool:
    with one_thread():  # a memory-bound compare: a second thread only waits for a core
        return pt.same_values(PT_EMBED, PT_HEAD)


def to_hf(model_dir: str, out_dir: str, *, dtype: str = "keep", family: str = "auto",
          max_shard_size: str | int = "5GB", force: bool = False, progress=None, strict: bool = False) -> Report:
    """CosyVoice model directory → merged Hugging Face directory (+ sidecar for an exact way back).
    NaN/Inf in the weights are reported; `strict` refuses them."""
    from .tokens import build_hf_tokenizer

    t0 = time.perf_counter()
    progress = progress or NoProgress()
    target = target_dtype(dtype)
    shard_limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    md, pt, infos = read_native(model_dir, family)
    with pt:
        check_output(out_dir, md.inputs, force)
        fam: Family = md.family
        tokenizer = build_hf_tokenizer(md.blanken, fam, md.llm.speech_token_size)  # built once, checked first
        layout = TokenLayout(fam, tokenizer.speech_offset, infos[PT_EMBED].rows, md.llm.speech_token_size)
        report = Report("to-hf", model_dir, out_dir, fam.name, layout=layout.as_dict())
        for n in pt.notes:
            note(report, f"{md.llm_pt}: {n}")
        tied = lm_head_tied(pt)
        model, side = plan_to_hf(infos, layout, dtype=target, lm_head_tied=tied)
        for n in model.notes:
            note(report, n)
        log_casts(report, model, infos, target)
        progress.start(plan_bytes(model) + plan_bytes(side))
        out_dtype = model.tensors[0].dtype
        check = NonFiniteCheck(strict)
        with atomic_dir(out_dir) as tmp:
            report.bytes += write_hf_weights(tmp, model, pt, progress, shard_limit, check)
            with HFWeights(tmp) as written:
                fp = fingerprint(written)
            if side.tensors:
                meta = {"cosybridge": "sidecar", "version": "1", "family": fam.name,
                        "base_vocab_size": str(layout.base_rows), "speech_token_offset": str(layout.speech_offset),
                        "lm_head": "tied" if tied else "untied", "model_fingerprint": fp}
                with open(os.path.join(tmp, SIDECAR), "wb") as f:
                    report.bytes += write_safetensors(f, [(t.name, t.dtype, t.shape) for t in side.tensors], meta,
                                                      plan_chunks(pt, side, progress, check))
            write_json(os.path.join(tmp, "config.json"), _hf_config(md.qwen_config, layout, out_dtype,
                                                                     DECODER_B in infos))
            write_json(os.path.join(tmp, "generation_config.json"), _generation_config(md.qwen_config, layout))
            tokenizer.write(tmp)
            if fam.name == "cosyvoice3":
                write_json(os.path.join(tmp, CV3_METADATA), _cv3_metadata(layout, out_dtype, tokenizer.base_len))
        report.tensors = len(model.tensors) + len(side.tensors)
    report_nonfinite(report, check)
    progress.close()
    report.seconds = time.perf_counter() - t0
    return report


def write_hf_weights(directory: str, plan: Plan, source, progress, shard_limit: int, check=None) -> int:
    """model.safetensors, or shards + model.safetensors.index.json when over shard_limit."""
    from .io.dtypes import nbytes

    shards = plan_shards([(t.name, nbytes(t.dtype, t.shape)) for t in plan.tensors], shard_limit)
    chunks = plan_chunks(source, plan, progress, check)
    written = 0
    for fname, names in shards.files.items():
        wanted = set(names)
        entries = [(t.name, t.dtype, t.shape) for t in plan.tensors if t.name in wanted]
        with open(os.path.join(directory, fname), "wb") as f:
            written += write_safetensors(f, entries, {"format": "pt"}, chunks)
    if shards.index:
        write_json(os.path.join(directory, INDEX), shards.index)
    return written


def _hf_config(qwen: dict, layout: TokenLayout, dtype: str, bias: bool) -> dict:
    config = {k: v for k, v in qwen.items() if k not in ("_name_or_path", "transformers_version")}
    config.update({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": layout.vocab_size, "tie_word_embeddings": False,
        "eos_token_id": layout.eos_id,
        "torch_dtype": torch_name(dtype),
        META_KEY: {**layout.as_dict(), "lm_head_bias": bias},
    })
    if bias:
        config["use_bias"] = True  # what upstream records; transformers and vLLM still ignore lm_head.bias
    return config


def _generation_config(qwen: dict, layout: TokenLayout) -> dict:
    return {"do_sample": True, "eos_token_id": layout.eos_ids,
            "pad_token_id": qwen.get("pad_token_id", qwen.get("eos_token_id")),
            **layout.family.generation}


def _cv3_metadata(layout: TokenLayout, dtype: str, blanken_len: int) -> dict:
    """The keys upstream's convert_cosyvoice3_to_hf.py writes, so TRT-LLM runtimes read ours unchanged."""
    return {"original_vocab_size": blanken_len, "text_vocab_size": layout.speech_offset,
            "base_speech_token_size": layout.speech_token_size, "embedding_size": layout.speech_rows,
            "padded_vocab_size": layout.vocab_size, "eos_token_id": layout.eos_id,
            "speech_token_offset": layout.speech_offset, "dtype": torch_name(dtype)}


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ---- Hugging Face → llm.pt ---------------------------------------------------------------------------

def to_pt(hf_dir: str, out_path: str, *, dtype: str = "keep", base: str | None = None, family: str = "auto",
          force: bool = False, progress=None, strict: bool = False) -> Report:
    """Merged Hugging Face directory → CosyVoice llm.pt, bit-identical to the original when the sidecar
    (or --base) supplies the rows the HF layout cannot hold. NaN/Inf in the weights are reported; `strict`
    refuses them."""
    t0 = time.perf_counter()
    progress = progress or NoProgress()
    target = target_dtype(dtype)
    # an output may sit beside --base's files (install-into stages its llm.pt there) but never on them
    check_output(out_path, [hf_dir] + (read_model_dir(base).inputs if base else []), force)
    hd = read_hf_dir(hf_dir, None if family == "auto" else family)
    report = Report("to-pt", hf_dir, out_path, hd.family.name)
    weights = HFWeights(hf_dir)
    sidecar = base_pt = None
    try:
        side_infos, side_tied, base_infos, base_tied = {}, True, {}, True
        base_rows, why = hd.recorded_base_rows()
        if hd.sidecar:
            sidecar = SafetensorsFile(hd.sidecar)
            side_infos = {n: sidecar.info(n) for n in sidecar.names()}
            side_tied = sidecar.metadata.get("lm_head", "tied") == "tied"
            recorded = int(sidecar.metadata.get("base_vocab_size", 0)) or None
            if base_rows and recorded and recorded != base_rows:
                raise CheckpointError(f"{hd.sidecar}: base_vocab_size {recorded} disagrees with config.json ({base_rows})")
            base_rows, why = recorded or base_rows, why or "the sidecar"
            if sidecar.metadata.get("model_fingerprint") not in (None, fingerprint(weights)):
                note(report, f"{hd.sidecar} was written for other weights (the model was trained since): "
                              "it still holds the original's rows the HF layout cannot carry, and they are used")
        if base:
            md = read_model_dir(base)
            if md.family is not hd.family:
                raise CheckpointError(f"--base {base} is {md.family.name} but {hf_dir} is {hd.family.name}; "
                                      f"pass the {hd.family.name} model directory this checkpoint was trained from")
            base_pt = PtFile(md.llm_pt)
            for n in base_pt.notes:  # a training checkpoint as --base: say what was unwrapped or stripped
                note(report, f"{md.llm_pt}: {n}")
            base_infos = {n: base_pt.info(n) for n in base_pt.names()}
            if PT_EMBED not in base_infos:
                raise CheckpointError(f"{md.llm_pt}: no {PT_EMBED}")
            base_tied = lm_head_tied(base_pt) if PT_HEAD in base_infos else True
            if not base_rows:
                base_rows, why = base_infos[PT_EMBED].rows, f"--base {base}"
            elif base_rows != base_infos[PT_EMBED].rows:
                raise CheckpointError(f"--base {base} has {base_infos[PT_EMBED].rows} embedding rows but {why} "
                                      f"records {base_rows}")
        if not base_rows:
            base_rows, why = default_base_rows()
            note(report, f"original embedding rows: {why}")
        layout = hd.layout(base_rows)
        report.layout = layout.as_dict()
        hf_infos = {n: weights.info(n) for n in weights.names()}
        plan = plan_to_pt(hf_infos, layout, dtype=target, sidecar=side_infos, sidecar_tied=side_tied,
                          base=base_infos, base_tied=base_tied)
        for n in plan.notes:
            note(report, n)
        log_casts(report, plan, {**hf_infos, **side_infos, **base_infos}, target)
        source = CombinedSource(weights, sidecar, base_pt)
        progress.start(plan_bytes(plan))
        check = NonFiniteCheck(strict)
        with atomic_file(out_path) as f:
            report.bytes = write_pt(f, [(t.name, t.dtype, t.shape, t.alias_of) for t in plan.tensors],
                                    plan_chunks(source, plan, progress, check))
        report.tensors = len(plan.tensors)
        report_nonfinite(report, check)
    finally:
        for s in (weights, sidecar, base_pt):
            if s is not None:
                s.close()
        progress.close()
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["Report", "to_hf", "to_pt", "read_native"]

"""`cosybridge inspect`: what a CosyVoice LLM checkpoint is, and what will trip CosyVoice or a serving engine.

Detection reads file names, JSON and tensor headers only; tensor data is read for the tied-lm_head check,
fingerprints (first and last row of each tensor) and, only when asked (`scan=True`, --scan), the inf/NaN
scan: reading every byte would cost more than everything else together at full size. The report is a plain dict (inspect_report.py); `render` turns it into text. No transformers here:
inspect must answer in seconds on a machine without a GPU stack.
"""
from __future__ import annotations

import os

from .errors import CheckpointError
from .families import FAMILIES, PT_BACKBONE_PREFIX, SPEECH_TOKEN_SIZE, Family, TokenLayout
from .inspect_hf import check_export, hf_report, vllm_report
from .inspect_report import DIMS, add_groups, new_report, scan_nonfinite, shapes_warning, token_ids, warn
from .keyset import compare_keys, expected_pt_shapes
from .modeldir import BLANKEN, LLM_PT, read_json, read_model_dir
from .plan import DECODER_B, DECODER_W, LLM_EMB, PT_EMBED, PT_HEAD, SPEECH_EMB
from .sides import detect, family_tokenizer, not_cosyvoice


def inspect_path(path: str, *, scan: bool = False) -> dict:
    """The report for any supported checkpoint; CheckpointError for anything else."""
    path = str(path)
    kind = detect(path)
    if kind == "pt":
        return _native(path, None, scan)
    if kind == "hf":
        return hf_report(path, scan)
    if kind == "vllm":
        return vllm_report(path, read_json(os.path.join(path, "config.json")), scan)
    try:
        md = read_model_dir(path)
    except CheckpointError as e:
        if not os.path.isfile(os.path.join(path, LLM_PT)):
            raise
        report = _native(os.path.join(path, LLM_PT), None, scan)  # what the llm.pt is, and what is missing
        warn(report, "incomplete_model_dir", str(e))
        return report
    return _native(path, md, scan)


# ---- llm.pt and model directories ----------------------------------------------------------------------

def _family_from_keys(infos: dict, path: str) -> tuple[Family, int]:
    """CosyVoice2 has llm_embedding; CosyVoice3 has none and 6561 + 200 speech rows."""
    missing = [k for k in (PT_EMBED, SPEECH_EMB, DECODER_W) if k not in infos]
    if missing:
        some = ", ".join(sorted(infos)[:4])
        raise not_cosyvoice(f"{path} has no {', '.join(missing)} (its keys start {some}, …)")
    rows = infos[SPEECH_EMB].rows
    with_emb = [f for f in FAMILIES.values() if bool(f.llm_embedding_rows) == (LLM_EMB in infos)]
    for fam in with_emb:
        if fam.llm_embedding_rows or rows == fam.speech_rows(SPEECH_TOKEN_SIZE):
            return fam, rows - fam.speech_extra
    expected = ", ".join(f"{f.name}: {f.speech_rows()}" for f in with_emb)
    raise not_cosyvoice(f"{path}: speech_embedding has {rows} rows and no llm_embedding ({expected} expected)")


def _model_dir_beside(pt_path: str):
    try:
        return read_model_dir(os.path.dirname(os.path.abspath(pt_path)))
    except CheckpointError:
        return None


def _native(path: str, md, scan: bool) -> dict:
    from .convert import lm_head_tied
    from .io.pt_io import PtFile

    pt_path = md.llm_pt if md else path
    md = md or _model_dir_beside(path)
    if md and os.path.abspath(md.llm_pt) != os.path.abspath(pt_path):
        md = None  # another .pt beside a model dir: its yaml describes llm.pt, not this file
    with PtFile(pt_path) as pt:
        infos = {n: pt.info(n) for n in pt.names()}
        fam, size = _family_from_keys(infos, pt_path)
        if md and md.family is fam:
            size = md.llm.speech_token_size
        fmt = "model_dir" if os.path.isdir(path) else ("training_checkpoint" if pt.notes else "llm_pt")
        report = new_report(path, fmt, "cosyvoice", fam, size)
        if pt.notes:
            report["training"] = {"wrapper": pt.wrapper, "notes": list(pt.notes)}
            warn(report, "training_entries",
                f"{pt_path}: {'; '.join(pt.notes)}. CosyVoice's strict load fails on this file; cosybridge "
                "handles it (`cosybridge to-hf`, then `to-pt` gives a clean llm.pt)")
        report["lm_head_bias"] = DECODER_B in infos
        report["tied_embeddings"] = PT_HEAD not in infos or lm_head_tied(pt)
        report["backbone"].update(_dims_from_shapes(infos))
        if md:
            report["backbone"].update({k: md.qwen_config.get(k) for k in DIMS})
            if md.family is not fam:
                warn(report, "family_mismatch", f"{pt_path} is a {fam.name} checkpoint but {md.yaml_path} names "
                                               f"{md.llm.lm_class} ({md.family.name}): use the {fam.yaml_name} "
                                               "that came with this llm.pt")
            shapes_warning(report, f"{pt_path} vs {os.path.basename(md.yaml_path)} + {BLANKEN}/config.json",
                           compare_keys({n: i.shape for n, i in infos.items()},
                                        expected_pt_shapes(md.family, md.qwen_config, md.llm.speech_token_size)))
            offset = family_tokenizer(md.blanken, fam).get_vocab_size(with_added_tokens=True)  # id of <|s_0|>
            layout = TokenLayout(fam, offset, infos[PT_EMBED].rows, size)
            report["tokens"] = token_ids(layout)
            export = os.path.join(md.path, "vllm")
            if os.path.isfile(os.path.join(export, "config.json")):
                check_export(report, export, md.llm_pt, pt)
        else:
            report["notes"].append("no cosyvoice2/3.yaml and CosyVoice-BlankEN/ beside this file: Hugging Face "
                                   "token ids and the yaml comparison need the model directory")
        if not report["tied_embeddings"]:
            report["notes"].append("llm.model.lm_head.weight is not tied to embed_tokens (CosyVoice never uses it)")
        shared = frozenset({PT_HEAD} if PT_HEAD in infos and pt.shares_storage(PT_EMBED, PT_HEAD) else ())
        add_groups(report, infos, _pt_group, shared)
        if scan:
            scan_nonfinite(report, pt, [n for n in infos if n not in shared])
    return report


def _dims_from_shapes(infos: dict) -> dict:
    """What the shapes alone tell (head counts need the config: q_proj rows are heads × head_dim)."""
    layers = {n[len(_LAYERS):].split(".")[0] for n in infos if n.startswith(_LAYERS)}
    gate = infos.get(_LAYERS + "0.mlp.gate_proj.weight")
    return {"hidden_size": infos[PT_EMBED].shape[-1], "num_hidden_layers": len(layers),
            "intermediate_size": gate.shape[0] if gate else None}


_LAYERS = PT_BACKBONE_PREFIX + "model.layers."


def _pt_group(name: str) -> str:
    named = {PT_EMBED: "embed_tokens", PT_HEAD: "lm_head", SPEECH_EMB: "speech_embedding", DECODER_W: "llm_decoder",
             DECODER_B: "llm_decoder", LLM_EMB: "llm_embedding"}
    return named.get(name) or ("backbone" if name.startswith("llm.model.") else "other")


def render(report: dict) -> str:
    from .textreport import render_inspect

    return render_inspect(report)

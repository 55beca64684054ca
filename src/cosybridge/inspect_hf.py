"""`inspect` for the Hugging Face layouts: the merged text+speech directory (ours or upstream's, single or
sharded) and the speech-only vLLM export, with the staleness check CosyVoice itself never makes."""
from __future__ import annotations

import os

from .errors import CheckpointError
from .families import FAMILIES, QWEN2_EMBED_ROWS, SPEECH_TOKEN_SIZE, Family, TokenLayout
from .hfdir import SIDECAR, fingerprint, read_hf_dir
from .inspect_report import DIMS, add_groups, new_report, scan_nonfinite, shapes_warning, token_ids, warn
from .io.sharded import INDEX, HFWeights
from .keyset import hf_key_report
from .modeldir import LLM_PT, read_json
from .plan import DECODER_W, HF_BIAS, HF_EMBED, HF_HEAD, SPEECH_EMB
from .sides import not_cosyvoice
from .values import count_nonfinite, rows_equal
from .vllm_export import BIAS_ARCHITECTURE, SOURCE_KEY


def _hf_group(name: str) -> str:
    named = {HF_EMBED: "embed_tokens", HF_HEAD: "lm_head", HF_BIAS: "lm_head"}
    return named.get(name) or ("backbone" if name.startswith("model.") else "other")

def _hf_checks(report: dict, path: str, config: dict, infos: dict, fam: Family, *, speech_only: bool) -> None:
    """Weights against config.json, and what transformers / vLLM will do with lm_head.bias."""
    shapes_warning(report, f"{path}: weights vs config.json", hf_key_report(path, config, infos))
    report["backbone"].update({k: config.get(k) for k in DIMS})
    report["lm_head_bias"] = HF_BIAS in infos
    report["tied_embeddings"] = HF_HEAD not in infos or bool(config.get("tie_word_embeddings"))
    arch = (config.get("architectures") or [None])[0]
    if HF_BIAS in infos and not fam.decoder_bias:
        warn(report, "lm_head_bias_ignored", f"lm_head.bias is stored but {fam.name}'s llm_decoder has no bias: "
                                             "to-pt drops it, and transformers and vLLM ignore it")
    elif HF_BIAS in infos and speech_only and arch == BIAS_ARCHITECTURE:
        report["notes"].append(f"architectures {arch}: vLLM applies lm_head.bias only with CosyVoice's own model "
                               "class, which CosyVoice registers at start-up")
    elif HF_BIAS in infos:
        lost = ("the decoder bias is lost" if speech_only else
                "the decoder bias is lost and text tokens are no longer masked (-inf)")
        warn(report, "lm_head_bias_ignored",
             f"lm_head.bias is stored, but transformers' and vLLM's Qwen2ForCausalLM ignore it: loaded there, "
             f"{lost}; CosyVoice (via `cosybridge to-pt`) and `cosybridge verify` use it")
    elif fam.decoder_bias:
        masked = "" if speech_only else "text tokens are not masked, so sampling can pick them, and "
        warn(report, "no_lm_head_bias",
             f"no lm_head.bias (RL training drops it): {masked}to-pt writes llm_decoder.bias as zeros, so "
             "logits differ from the llm.pt it came from")


def hf_report(path: str, scan: bool) -> dict:
    try:
        hd = read_hf_dir(path)
    except CheckpointError as e:
        raise not_cosyvoice(str(e)) from None
    with HFWeights(path) as weights:
        infos = {n: weights.info(n) for n in weights.names()}
        if HF_EMBED not in infos:
            raise not_cosyvoice(f"{path} has no {HF_EMBED}")
        sidecar = None
        if hd.sidecar:
            from .io.safetensors_io import SafetensorsFile

            sidecar = SafetensorsFile(hd.sidecar)
        try:
            base, why = hd.recorded_base_rows()
            if base is None and sidecar and sidecar.metadata.get("base_vocab_size", "").isdigit():
                base = int(sidecar.metadata["base_vocab_size"])
            report = new_report(path, "hf", "cosybridge" if hd.meta or hd.sidecar else "upstream", hd.family,
                                hd.speech_token_size)
            report["sharded"] = os.path.exists(os.path.join(path, INDEX))
            if base is None:
                base = QWEN2_EMBED_ROWS
                report["notes"].append(f"original embedding rows unknown (no cosybridge record): assuming the "
                                       f"Qwen2.5 default {QWEN2_EMBED_ROWS}")
            layout = hd.layout(base)
            report["tokens"] = token_ids(layout, infos[HF_EMBED].rows)
            if infos[HF_EMBED].rows < layout.tokenizer_len:
                warn(report, "shape_mismatch", f"{path}: embed_tokens has {infos[HF_EMBED].rows} rows but the "
                                               f"tokenizer has {layout.tokenizer_len} tokens")
            _hf_checks(report, path, hd.config, infos, hd.family, speech_only=False)
            add_groups(report, infos, _hf_group)
            if sidecar:
                add_groups(report, {n: sidecar.info(n) for n in sidecar.names()}, lambda n: "sidecar")
                recorded, now = sidecar.metadata.get("model_fingerprint"), fingerprint(weights)
                if recorded not in (None, now):
                    warn(report, "stale_sidecar",
                         f"{SIDECAR} was written for other weights (fingerprint {recorded}, the weights now give "
                         f"{now}): the model was trained or edited since to-hf; to-pt still takes the original's "
                         "rows the HF layout cannot hold from it, which is right for a fine-tune of that model")
            _check_generation(report, path, layout)
            if scan:
                off = layout.speech_offset
                scan_nonfinite(report, weights, list(infos), (off, off + layout.speech_rows))
                if sidecar:
                    _scan_more(report, sidecar)
        finally:
            if sidecar:
                sidecar.close()
    return report


def _scan_more(report: dict, source) -> None:
    extra = {n: count_nonfinite(source, n) for n in source.names()}
    extra = {n: c for n, c in extra.items() if c}
    if extra:
        report["nonfinite"]["tensors"].update(extra)
        warn(report, "nonfinite", f"inf/NaN values in {source.path}: {', '.join(sorted(extra))}")


def _check_generation(report: dict, path: str, layout: TokenLayout) -> None:
    gen_path = os.path.join(path, "generation_config.json")
    eos = read_json(gen_path).get("eos_token_id") if os.path.exists(gen_path) else None
    eos = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    missing = [i for i in layout.eos_ids if i not in eos]
    if missing:
        warn(report, "eos_ids_incomplete",
             f"generation_config.json stops on {len(layout.eos_ids) - len(missing)} of the {len(layout.eos_ids)} "
             f"ids CosyVoice stops on ({layout.eos_ids[0]}..{layout.eos_ids[-1]}): HF and vLLM generation runs "
             "past CosyVoice's stop tokens; list them all in eos_token_id")


def vllm_report(path: str, config: dict, scan: bool) -> dict:
    with HFWeights(path) as weights:
        infos = {n: weights.info(n) for n in weights.names()}
        if HF_EMBED not in infos:
            raise not_cosyvoice(f"{path} has no {HF_EMBED}")
        rows = infos[HF_EMBED].rows
        fams = [f for f in FAMILIES.values() if f.speech_rows() == rows]
        if not fams:
            raise not_cosyvoice(f"{path}: a speech-only export with {rows} embedding rows, which is neither "
                                + " nor ".join(f"{f.name} ({f.speech_rows()})" for f in FAMILIES.values()))
        fam = fams[0]
        record = config.get(SOURCE_KEY)
        report = new_report(path, "vllm", "cosybridge" if record else "cosyvoice", fam, SPEECH_TOKEN_SIZE)
        report["sharded"] = os.path.exists(os.path.join(path, INDEX))
        ids = report["speech_ids"]
        report["tokens"].update(speech_token_offset=0, sos_id=ids["sos"], task_id_id=ids["task_id"],
                                eos_id=ids["eos"], eos_ids=list(range(ids["stop_first"], ids["stop_last"] + 1)),
                                vocab_size=rows, padding_rows=0)
        if config.get("vocab_size") != rows:
            warn(report, "shape_mismatch", f"{path}: config.json vocab_size {config.get('vocab_size')} but "
                                           f"embed_tokens has {rows} rows")
        _hf_checks(report, path, {**config, "vocab_size": rows}, infos, fam, speech_only=True)
        add_groups(report, infos, _hf_group)
        candidates = [os.path.join(os.path.dirname(os.path.abspath(path)), LLM_PT)]
        if isinstance(record, dict) and isinstance(record.get("llm_pt"), str):
            candidates.append(record["llm_pt"])
        beside = next((c for c in candidates if os.path.isfile(c)), None)
        if beside:
            from .io.pt_io import PtFile

            with PtFile(beside) as pt:
                check_export(report, path, beside, pt)
        else:
            report["notes"].append("no llm.pt beside the export or at its recorded path: staleness not checked")
        if scan:
            scan_nonfinite(report, weights, list(infos))
    return report


def check_export(report: dict, export: str, llm_pt: str, pt) -> None:
    """CosyVoice writes <model_dir>/vllm once and reuses it forever, so a replaced llm.pt is silently ignored."""
    config = read_json(os.path.join(export, "config.json"))
    record = config.get(SOURCE_KEY) if isinstance(config.get(SOURCE_KEY), dict) else {}
    info = {"path": os.path.abspath(export), "llm_pt": os.path.abspath(llm_pt), "checked_by": None,
            "recorded_fingerprint": record.get("fingerprint"), "fingerprint": None, "stale": None}
    if info["recorded_fingerprint"]:
        info["fingerprint"] = fingerprint(pt)
        info.update(checked_by="fingerprint", stale=info["fingerprint"] != info["recorded_fingerprint"])
        how = f"fingerprint {info['recorded_fingerprint']} recorded, {info['fingerprint']} now"
    else:
        # CosyVoice's own export records nothing: compare the rows it copied, in the export's dtype
        with HFWeights(export) as w:
            same = all(n in w.names() and rows_equal(w, n, pt, src) for n, src in
                       ((HF_EMBED, SPEECH_EMB), (HF_HEAD, DECODER_W)))
        info.update(checked_by="contents", stale=not same)
        how = "its embed_tokens / lm_head differ from speech_embedding / llm_decoder"
    report["vllm_export"] = info
    if info["stale"]:
        model_dir = os.path.dirname(os.path.abspath(llm_pt))
        warn(report, "stale_vllm_export",
             f"{export} was exported from a different llm.pt than {llm_pt} ({how}): CosyVoice reuses "
             f"<model_dir>/vllm without checking, so vLLM would serve the old weights; rewrite it with "
             f"`cosybridge to-vllm {model_dir} --force`")

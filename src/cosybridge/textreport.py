"""Text for people from the plain-dict reports of `inspect` and `verify` (their --json prints the dicts)."""
from __future__ import annotations


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _ids(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"


def _row(label: str, text: str) -> str:
    return f"  {label:<12}{text}"


def render_inspect(r: dict) -> str:
    lines = [f"{r['path']}: {r['format_name']}, {r['family']} ({r['lm_class']}), written by {r['written_by']}"
             + (", sharded" if r["sharded"] else "")]
    b = r["backbone"]
    heads = f"heads {b['num_attention_heads']} · kv heads {b['num_key_value_heads']} · " \
        if b["num_attention_heads"] is not None else ""
    lines.append(_row("backbone", f"hidden {b['hidden_size']} · layers {b['num_hidden_layers']} · {heads}"
                                  f"intermediate {b['intermediate_size']}"))
    s = r["speech_ids"]
    sos = (f"sos {s['sos']} · task_id {s['task_id']}" if s["sos"] is not None
           else "sos, task_id: llm_embedding rows 0, 1")
    lines.append(_row("speech", f"{r['speech_token_size']} tokens, {r['speech_rows']} rows · eos {s['eos']} · "
                                f"stops on {_ids(s['stop_first'], s['stop_last'])} · {sos}"))
    t = r["tokens"]
    if t["speech_token_offset"] is not None:
        stops = _ids(t["eos_ids"][0], t["eos_ids"][-1])
        sos_ids = (f"sos {t['sos_id']} · task_id {t['task_id_id']}" if t["sos_id"] is not None
                   else "sos, task_id: fed as embeddings")
        where = "speech-only vocabulary" if r["format"] == "vllm" else "merged HF vocabulary"
        lines.append(_row("token ids", f"<|s_0|> {t['speech_token_offset']} · eos {t['eos_id']} (stops on {stops}) · "
                                       f"{sos_ids}  [{where}]"))
        vocab = f"{t['vocab_size']} rows"
        if t["tokenizer_len"] is not None:
            vocab = f"tokenizer {t['tokenizer_len']} tokens, {vocab} ({t['padding_rows']} padding)"
        if t["base_vocab_size"] is not None:
            vocab += f" · llm.pt embed_tokens {t['base_vocab_size']} rows"
        lines.append(_row("vocab", vocab))
    tied = {True: "yes", False: "no", None: "unknown"}[r["tied_embeddings"]]
    lines.append(_row("lm_head", f"bias {'yes' if r['lm_head_bias'] else 'no'} · tied to embed_tokens {tied}"))
    for i, (name, g) in enumerate(r["groups"].items()):
        text = f"{name:<17}{g['tensors']:>4} × {'/'.join(g['dtypes']):<8}{_size(g['bytes']):>10}"
        lines.append(_row("tensors" if i == 0 else "", text))
    lines.append(_row("", f"{'total':<17}{'':>15}{_size(r['total_bytes']):>10}"))
    nf = r["nonfinite"]
    if not nf["checked"]:
        values = "not scanned (pass --scan to count NaN/Inf)"
    elif nf["tensors"]:
        values = f"inf/NaN in {len(nf['tensors'])} tensor(s)"
    else:
        values = "all finite"
    if nf["masked_bias_entries"]:
        values += f" (besides the {nf['masked_bias_entries']} expected -inf text-mask entries of lm_head.bias)"
    lines.append(_row("values", values))
    if r["training"]:
        lines.append(_row("training", "; ".join(r["training"]["notes"])))
    e = r["vllm_export"]
    if e:
        state = "STALE" if e["stale"] else "current"
        lines.append(_row("vllm export", f"{e['path']}: {state} against {e['llm_pt']} (checked by {e['checked_by']})"))
    lines += [f"warning [{w['code']}]: {w['message']}" for w in r["warnings"]]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def _keys_line(k: dict) -> str:
    if k["ok"]:
        return "ok"
    parts = [f"{len(k[t])} {t}: {', '.join(k[t][:5])}{' …' if len(k[t]) > 5 else ''}"
             for t in ("missing", "unexpected") if k[t]]
    parts += [f"size mismatch for {m['key']}: checkpoint {m['checkpoint']}, model {m['model']}"
              for m in k["mismatched"][:5]]
    if len(k["mismatched"]) > 5:
        parts.append(f"… {len(k['mismatched']) - 5} more size mismatches")
    return "; ".join(parts + k["problems"])


def render_verify(r: dict) -> str:
    lines = [f"{label.upper()}  {s['path']} ({s['format_name']}, {s['family']}, {'/'.join(s['dtypes'])})"
             for label, s in (("a", r["a"]), ("b", r["b"]))]
    lines.append(_row("keys", f"A: {_keys_line(r['keys']['a'])} · B: {_keys_line(r['keys']['b'])}"))
    for d in r["config_differences"]:
        lines.append(_row("config", f"{d['key']}: A {d['a']}, B {d['b']}"))
    w = r["weights"]
    if w:
        if not (w["differing"] or w["only_in_a"] or w["only_in_b"]):
            state = "all equal" + ("" if w["exact"] else " (F16 vs BF16: compared in F32, not exact)")
        else:
            state = f"{len(w['differing']) + len(w['only_in_a']) + len(w['only_in_b'])} differ"
        lines.append(_row("weights", f"{w['compared']} tensors compared in {w['dtype']}: {state}"))
        for d in w["differing"]:
            what = (f"{d['rows_differing']} row(s) differ, first row {d['first_row']}, max |Δ| {d['max_abs_diff']:.3g}"
                    if d["rows_differing"] is not None else f"shapes {d['shapes'][0]} vs {d['shapes'][1]}")
            lines.append(_row("", f"{d['name']}: {what}"))
        for label in ("a", "b"):
            for name in w[f"only_in_{label}"]:
                lines.append(_row("", f"{name}: only in {label.upper()}"))
    i = r["inputs"]
    if i:
        lines.append(_row("inputs", f"sos + {len(i['text_ids'])} text tokens + task_id + "
                                    f"{len(i['prompt_speech_tokens'])} prompt speech tokens, then "
                                    f"{i['steps']} greedy steps; text {i['text']!r}"))
    lg = r["logits"]
    if lg:
        lines.append(_row("logits", f"max |Δ| {lg['max_abs_diff']:.3g} over {lg['rows']} speech rows × "
                                    f"{lg['positions']} positions, weights in {lg['compared_in']}, computed in F32 "
                                    f"(tolerance {lg['tolerance']:g}; largest |logit| {lg['reference_max_abs']:.3g})"))
        t = r["top1"]
        lines.append(_row("top-1", f"{t['agree']}/{t['of']} decoding positions agree"))
        g = r["greedy"]
        if g["equal"]:
            state = f"{g['steps']}/{g['steps']} tokens equal"
        else:
            k = g["first_difference"]
            state = (f"differ from step {k} (A {g['a'][k]}, B {g['b'][k]})"
                     + (": a near tie within the tolerance" if g["near_tie"] else ""))
        lines.append(_row("greedy", f"{state}: A {' '.join(map(str, g['a']))}"))
        if not g["equal"]:
            lines.append(_row("", f"{'':{len(state) + 2}}B {' '.join(map(str, g['b']))}"))
    p = r.get("precision")
    if p:
        greedy = ("greedy equal" if p["greedy_equal"] else f"greedy differs from step {p['first_difference']}")
        share = p["max_abs_diff"] / max(p["reference_max_abs"], 1e-30)
        lines.append(_row("precision", f"{p['rounded_side']} as stored vs rounded to {p['dtype']}: max |Δ| "
                                       f"{p['max_abs_diff']:.3g} ({share:.1%} "
                                       f"of the largest |logit|), top-1 {p['top1']['agree']}/{p['top1']['of']}, "
                                       f"{greedy} — what {p['dtype']} itself costs, not judged"))
    lines.append(_row("result", "EQUIVALENT" if r["equivalent"] else "NOT EQUIVALENT"))
    lines += [f"  - {reason}" for reason in r["reasons"]]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)

"""`cosybridge verify A B`: are two checkpoints the same model? Proven three ways, each reported in full.

1. keys: each side against the strict key set its loader uses (CosyVoice's LM class for llm.pt, transformers'
   Qwen2 for HF layouts), every missing / unexpected / mismatched key at once;
2. weights: every row CosyVoice reads, compared after casting both sides to the lower precision of the two,
   so an exact conversion (including a bf16 one) compares equal and a single changed row shows up;
3. logits: both sides run through transformers' Qwen2 on the sequence CosyVoice builds (sos, text, task_id,
   prompt speech tokens), in float32 so that only the weights differ, then greedy decoding. The CosyVoice
   side uses the checkpoint's own speech_embedding / llm_decoder (+ bias); an HF side its own embed_tokens
   and lm_head (+ stored bias); a vLLM export its embed_tokens (speech rows) and lm_head.

The only module besides the tests that runs model code; transformers is imported inside functions.
"""
from __future__ import annotations

from .errors import CheckpointError
from .plan import DECODER_B, DECODER_W, LLM_EMB, SPEECH_EMB
from .sides import Side, compare_weights, config_differences, open_side, shape_differences

TEXT = "Hello! This sentence checks that a converted CosyVoice model speaks exactly like the original."
# CosyVoice3 is trained with this system prompt before the text; it must contain <|endofprompt|> (FIELD_NOTES)
SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT_SPEECH_TOKENS = 24
# max |Δ logit| for the verdict. Both sides are computed in float32 with the weights at their common precision
# (a side stored in higher precision is rounded to the other's first), so the same model gives the same
# numbers whatever the dtypes: fp32 vs fp32 as the issue asks, and the same for a bf16 export against its fp32
# source. What the rounding itself costs is measured separately ("precision") and reported, not judged:
# measured max |Δ| from bf16 rounding, 0.0057 (tiny model) to 0.42 (0.5B, random weights) — larger than a
# dropped lm_head bias on the tiny model, so no fixed bf16 bound could tell a conversion bug from rounding.
TOLERANCE = 1e-5
# F16 against BF16 have no common precision: then only a relative bound on the logits is possible
F16_VS_BF16_RELATIVE = 0.1


def fixed_text(side: Side) -> str:
    needed = "".join(side.family.requires_in_prompt)
    return f"{SYSTEM_PROMPT}{needed}{TEXT}" if needed else TEXT


def prompt_speech_tokens(size: int, n: int = PROMPT_SPEECH_TOKENS) -> list[int]:
    """Fixed, spread over the codebook, all below speech_token_size (no stop tokens in the prompt)."""
    return [(797 * i + 13) % size for i in range(n)]


def verify(a_path: str, b_path: str, *, steps: int = 20, tolerance: float | None = None) -> dict:
    """The result dict (stable keys; `render` prints it). result["equivalent"] is the verdict."""
    a = open_side(a_path, "A")
    try:
        b = open_side(b_path, "B")
    except BaseException:
        a.close()
        raise
    try:
        return _verify(a, b, steps, tolerance)
    finally:
        a.close()
        b.close()


def _keys(side: Side) -> dict:
    return {"ok": side.keys.ok and not side.problems, **side.keys.as_dict(), "problems": side.problems}


def _verify(a: Side, b: Side, steps: int, tolerance: float | None) -> dict:
    result = {"a": a.summary(), "b": b.summary(), "keys": {"a": _keys(a), "b": _keys(b)},
              "config_differences": config_differences(a, b), "weights": None, "inputs": None, "logits": None,
              "top1": None, "greedy": None, "precision": None, "equivalent": False, "reasons": [], "notes": []}
    reasons = result["reasons"]
    for label, side in (("A", a), ("B", b)):
        if not result["keys"][label.lower()]["ok"]:
            reasons.append(f"{label} does not have the key set its loader expects (see keys)")
    if a.family is not b.family or a.speech_token_size != b.speech_token_size:
        reasons.append(f"A is {a.family.name} ({a.speech_rows} speech rows), B is {b.family.name} "
                       f"({b.speech_rows} speech rows)")
    if shape_differences(result["config_differences"]):
        reasons.append("the backbones have different shapes (see config_differences)")
    if reasons:
        return result
    if result["config_differences"]:
        reasons.append("the backbone configs differ: " + ", ".join(
            f"{d['key']} {d['a']} vs {d['b']}" for d in result["config_differences"]))
    result["weights"] = compare_weights(a, b)
    w = result["weights"]
    if w["exact"] and (w["differing"] or w["only_in_a"] or w["only_in_b"]):
        names = [d["name"] for d in w["differing"]] + w["only_in_a"] + w["only_in_b"]
        reasons.append(f"{len(names)} tensor(s) differ: {', '.join(names[:6])}")
    _compare_logits(result, a, b, steps, tolerance)
    result["equivalent"] = not reasons
    return result


class _Model:
    """One side as CosyVoice runs it: a float32 Qwen2 backbone fed embeddings, and the speech decoder."""

    def __init__(self, side: Side, borrowed: dict | None = None, round_to: str | None = None):
        import torch

        self.side = side
        tensors = []
        fam, size = side.family, side.speech_token_size
        if side.kind == "pt":
            self.backbone = self._pt_backbone(side)
            self.text = self.backbone.embed_tokens.weight
            self.speech, self.dec_w = self._read(SPEECH_EMB), self._read(DECODER_W)
            self.dec_b = self._read(DECODER_B) if DECODER_B in side.rows else None
            extra = self._read(LLM_EMB) if fam.llm_embedding_rows else None
            tensors = [*self.backbone.parameters(), self.speech, self.dec_w, self.dec_b, extra]
        else:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as tf_logging

            quiet, bar = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
            tf_logging.set_verbosity_error()  # it reports lm_head.bias as unused: we apply it ourselves
            tf_logging.disable_progress_bar()
            try:
                full = AutoModelForCausalLM.from_pretrained(side.path, dtype=torch.float32).eval()
            finally:
                tf_logging.set_verbosity(quiet)
                if bar:
                    tf_logging.enable_progress_bar()
            self.backbone = full.model
            embed, head = full.get_input_embeddings().weight, full.get_output_embeddings().weight
            off = side.text_offset or 0
            S = side.speech_rows
            self.text = embed[:off] if side.kind == "hf" else None
            self.speech, self.dec_w = embed[off:off + S], head[off:off + S]
            self.dec_b = self._read(DECODER_B) if DECODER_B in side.rows else None
            extra = embed[off + S:off + S + fam.llm_embedding_rows] if side.kind == "hf" else None
            tensors = [*full.parameters(), self.dec_b]
        if round_to:
            from .io.dtypes import to_torch

            for t in tensors:
                if t is not None:
                    t.copy_(t.to(to_torch(round_to)))  # in place: views (speech rows of embed_tokens) follow
        rows = {"llm_embedding": extra, "speech": self.speech}
        self.sos = rows[fam.sos[0]][fam.sos[1] + (size if fam.sos[0] == "speech" else 0)] \
            if rows[fam.sos[0]] is not None else None
        self.task = rows[fam.task_id[0]][fam.task_id[1] + (size if fam.task_id[0] == "speech" else 0)] \
            if rows[fam.task_id[0]] is not None else None
        borrowed = borrowed or {}
        self.sos = self.sos if self.sos is not None else borrowed.get("sos")
        self.task = self.task if self.task is not None else borrowed.get("task")
        self.borrowed_text = borrowed.get("text")

    def _read(self, name: str):
        tensor, start, stop = self.side.rows[name]
        return self.side.source.read(tensor, start, stop).float()

    @staticmethod
    def _pt_backbone(side: Side):
        """transformers' Qwen2Model from BlankEN's config.json with llm.pt's llm.model.model.* (strict)."""
        import torch
        from transformers import Qwen2Config, Qwen2Model

        config = Qwen2Config.from_pretrained(side.config_dir)
        with torch.device("meta"):
            model = Qwen2Model(config)
        prefix = "llm.model.model."
        state = {n[len(prefix):]: side.source.read(n).float() for n in side.source.names() if n.startswith(prefix)}
        model.load_state_dict(state, strict=True, assign=True)
        model.rotary_emb = type(model.rotary_emb)(config=config)  # inv_freq: computed at init, never stored
        return model.eval()

    def prompt(self, text_ids: list[int], speech_ids: list[int]):
        import torch

        text = self.text[text_ids] if self.text is not None else self.borrowed_text
        return torch.cat([self.sos[None], text, self.task[None], self.speech[speech_ids]])

    def hidden(self, embeds, cache=None):
        import inspect

        # transformers 5.25 renamed past_key_values to cache (4.x knows only past_key_values)
        params = inspect.signature(self.backbone.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        out = self.backbone(inputs_embeds=embeds[None], use_cache=cache is not None, **{name: cache})
        return out.last_hidden_state[0], cache

    def logits(self, hidden):
        import torch

        return torch.nn.functional.linear(hidden, self.dec_w, self.dec_b)

    def greedy(self, prompt, steps: int) -> list[int]:
        from transformers import DynamicCache

        hidden, cache = self.hidden(prompt, DynamicCache())
        tokens = []
        for step in range(steps):
            tokens.append(int(self.logits(hidden[-1]).argmax()))
            if step + 1 < steps:
                hidden, cache = self.hidden(self.speech[tokens[-1:]], cache)
        return tokens

    def forced_logits(self, prompt, tokens: list[int]):
        import torch

        return self.logits(self.hidden(torch.cat([prompt, self.speech[tokens]]))[0])


def _text_ids(result: dict, a: Side, b: Side) -> tuple[Side, list[int]]:
    """The fixed text's ids from the tokenizer of the side that holds text rows (both must agree)."""
    with_text = [s for s in (a, b) if s.kind != "vllm"]
    if not with_text:
        raise CheckpointError("verify needs one side with a text embedding (a CosyVoice model dir / llm.pt or a "
                              "merged HF dir): a vLLM export holds only the speech rows")
    ref = with_text[0]
    text = fixed_text(ref)
    ids = {s.label: s.tokenizer.encode(text, add_special_tokens=False).ids for s in with_text if s.tokenizer}
    if not ids:
        raise CheckpointError(f"{ref.path}: no tokenizer.json to turn the fixed text into ids; copy the tokenizer "
                              "files from the model it was converted from")
    if len(set(map(tuple, ids.values()))) > 1:
        result["reasons"].append(f"the tokenizers disagree on the fixed text: A {ids['A'][:8]}…, B {ids['B'][:8]}…")
    return ref, ids.get(ref.label) or next(iter(ids.values()))


def _run(side: Side, ids: list[int], speech: list[int], steps: int, round_to: str | None,
         borrowed: dict | None, forced: list[int] | None):
    """Greedy tokens, logits over the speech rows on prompt + forced (or its own) tokens, and the rows a vLLM
    export would borrow from this side."""
    model = _Model(side, borrowed, round_to)
    prompt = model.prompt(ids, speech)
    tokens = model.greedy(prompt, steps)
    logits = model.forced_logits(prompt, tokens if forced is None else forced)
    lend = None
    if model.text is not None:
        lend = {"text": model.text[ids].clone(), "sos": model.sos.clone(), "task": model.task.clone()}
    return tokens, logits, lend


def _agreement(la, lb, ta: list[int], tb: list[int], first: int, tol: float) -> dict:
    """max |Δ| at every position; top-1 and greedy where the next speech token is picked (from `first`)."""
    delta = (la - lb).abs()
    k = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
    near_tie = None
    if k is not None:  # same prefix up to k: did they part at a near tie?
        pos = first + k
        near_tie = max(float(la[pos, ta[k]] - la[pos, tb[k]]), float(lb[pos, tb[k]] - lb[pos, ta[k]])) <= tol
    return {"logits": {"max_abs_diff": float(delta.max()), "tolerance": tol, "reference_max_abs": float(la.abs().max()),
                       "positions": la.shape[0], "rows": la.shape[1],
                       "worst_position": int(delta.max(dim=1).values.argmax())},
            "top1": {"agree": int((la[first:].argmax(dim=1) == lb[first:].argmax(dim=1)).sum()),
                     "of": la.shape[0] - first},
            "greedy": {"steps": len(ta), "a": ta, "b": tb, "equal": k is None, "first_difference": k,
                       "near_tie": near_tie}}


def _compare_logits(result: dict, a: Side, b: Side, steps: int, tolerance: float | None) -> None:
    import torch

    ref, ids = _text_ids(result, a, b)
    other = b if ref is a else a
    speech = prompt_speech_tokens(ref.speech_token_size)
    first = len(ids) + 2 + len(speech) - 1  # the positions whose logits pick the next speech token
    result["inputs"] = {"text": fixed_text(ref), "text_ids": ids, "prompt_speech_tokens": speech,
                        "sequence_length": first + 1, "steps": steps}
    w = result["weights"]
    common = w["dtype"] if w["exact"] else None
    # a side holding anything finer than the common precision is rounded to it (idempotent on the rest)
    rounded = {s.label: common if common and set(s.dtypes) - {common} else None for s in (a, b)}
    if other.kind == "vllm":
        result["notes"].append(f"{other.label} is a vLLM export: its text rows"
                               + (" and sos/task_id" if other.family.llm_embedding_rows else "")
                               + f" come from {ref.label}, as CosyVoice feeds them as embeddings")
    with torch.inference_mode():
        t_ref, l_ref, lend = _run(ref, ids, speech, steps, rounded[ref.label], None, None)
        t_other, l_other, _ = _run(other, ids, speech, steps, rounded[other.label], lend, t_ref)
        hi = next((s for s in (ref, other) if rounded[s.label]), None)
        if hi is not None:  # the same side unrounded: what the precision itself costs
            t_raw, l_raw, _ = _run(hi, ids, speech, steps, None, None if hi is ref else lend, t_ref)
    swap = ref is not a
    la, lb, ta, tb = (l_other, l_ref, t_other, t_ref) if swap else (l_ref, l_other, t_ref, t_other)
    if tolerance is None:
        tolerance = TOLERANCE if common else F16_VS_BF16_RELATIVE * float(la.abs().max())
    agreement = _agreement(la, lb, ta, tb, first, tolerance)
    result.update(agreement)
    result["logits"]["compared_in"] = common or "as stored (F16 vs BF16)"
    if hi is not None:
        lo_logits, lo_tokens = (l_other, t_other) if hi is ref else (l_ref, t_ref)
        p = _agreement(l_raw, lo_logits, t_raw, lo_tokens, first, tolerance)
        p["logits"].pop("tolerance")
        result["precision"] = {"dtype": common, "rounded_side": hi.label, **p["logits"], "top1": p["top1"],
                               "greedy_equal": p["greedy"]["equal"],
                               "first_difference": p["greedy"]["first_difference"]}
    g, worst = result["greedy"], result["logits"]["max_abs_diff"]
    if not worst <= tolerance:  # NaN fails too
        result["reasons"].append(f"max |Δ logit| {worst:.3g} is over the tolerance {tolerance:g}")
    if not g["equal"] and not g["near_tie"]:
        k = g["first_difference"]
        result["reasons"].append(f"greedy decoding differs from step {k}: A {g['a'][k]}, B {g['b'][k]}")


def render(result: dict) -> str:
    from .textreport import render_verify

    return render_verify(result)

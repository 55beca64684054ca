"""The strict key set and shapes CosyVoice's LM class will `load_state_dict(strict=True)` with.

Derived from the Qwen2 config (BlankEN config.json) and the family description, so a mismatch is
reported in full, all keys at once, before CosyVoice fails on the first one deep in its start-up.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .families import PT_BACKBONE_PREFIX, SPEECH_TOKEN_SIZE, Family


def qwen2_shapes(config: dict, vocab_rows: int | None = None) -> dict[str, tuple[int, ...]]:
    """Qwen2ForCausalLM's state dict (transformers' modeling_qwen2): name → shape."""
    h = config["hidden_size"]
    heads = config.get("num_attention_heads", 1)
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    inter = config.get("intermediate_size", 4 * h)
    v = vocab_rows if vocab_rows is not None else config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, h), p + "self_attn.q_proj.bias": (heads * head_dim,),
            p + "self_attn.k_proj.weight": (kv * head_dim, h), p + "self_attn.k_proj.bias": (kv * head_dim,),
            p + "self_attn.v_proj.weight": (kv * head_dim, h), p + "self_attn.v_proj.bias": (kv * head_dim,),
            p + "self_attn.o_proj.weight": (h, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


_LAYER_ORDER = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                "post_attention_layernorm.weight")


def qwen2_order(name: str) -> tuple:
    """Sort key giving Qwen2ForCausalLM.state_dict()'s order: transformers' save_pretrained writes names
    sorted as strings (layers 0, 1, 10, ...), which would reorder a converted llm.pt."""
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        rest = ".".join(parts[3:])
        return (1, int(parts[2]), _LAYER_ORDER.index(rest) if rest in _LAYER_ORDER else len(_LAYER_ORDER), rest)
    top = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 3}
    return (top.get(name, 2), 0, 0, name)


def expected_pt_shapes(family: Family, config: dict, speech_token_size: int = SPEECH_TOKEN_SIZE) -> dict:
    """Every key of the family's llm.pt with its shape."""
    h = config["hidden_size"]
    rows = family.speech_rows(speech_token_size)
    shapes = {PT_BACKBONE_PREFIX + k: s for k, s in qwen2_shapes(config).items()}
    shapes["speech_embedding.weight"] = (rows, h)
    shapes["llm_decoder.weight"] = (rows, h)
    if family.decoder_bias:
        shapes["llm_decoder.bias"] = (rows,)
    if family.llm_embedding_rows:
        shapes["llm_embedding.weight"] = (family.llm_embedding_rows, h)
    return shapes


@dataclass
class KeyReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # name, found, expected

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def lines(self, limit: int = 8) -> list[str]:
        out = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                shown = ", ".join(items[:limit]) + (f", … ({len(items) - limit} more)" if len(items) > limit else "")
                out.append(f"{len(items)} {title} key(s): {shown}")
        for name, found, want in self.mismatched[:limit]:
            out.append(f"size mismatch for {name}: checkpoint {list(found)}, model {list(want)}")
        if len(self.mismatched) > limit:
            out.append(f"… {len(self.mismatched) - limit} more size mismatches")
        return out

    def as_dict(self) -> dict:
        return {"missing": self.missing, "unexpected": self.unexpected,
                "mismatched": [{"key": n, "checkpoint": list(f), "model": list(w)} for n, f, w in self.mismatched]}


def hf_key_report(path: str, config: dict, infos: dict) -> KeyReport:
    """An HF directory's weights against transformers' strict Qwen2 key set for its config.json
    (lm_head.bias aside: only CosyVoice reads it; lm_head.weight optional when tied)."""
    from .errors import CheckpointError

    try:
        expected = qwen2_shapes(config)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json: missing or invalid {e} for a Qwen2 model") from None
    if "lm_head.weight" not in infos and config.get("tie_word_embeddings"):
        expected.pop("lm_head.weight")
    return compare_keys({n: i.shape for n, i in infos.items() if n != "lm_head.bias"}, expected)


def compare_keys(found: dict[str, tuple], expected: dict[str, tuple]) -> KeyReport:
    report = KeyReport(sorted(set(expected) - set(found)), sorted(set(found) - set(expected)))
    report.mismatched = [(k, tuple(found[k]), tuple(expected[k])) for k in expected
                         if k in found and tuple(found[k]) != tuple(expected[k])]
    return report

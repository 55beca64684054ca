"""The pure mapping between layouts: which output rows come from which source rows, in which dtype.

Plans are built from headers alone (name → TensorInfo) and validated completely (every source key used
or deliberately dropped, shapes add up) before a byte moves. No I/O here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import CheckpointError
from .families import PT_BACKBONE_PREFIX, TokenLayout
from .io.source import TensorInfo
from .keyset import qwen2_order

HF_EMBED, HF_HEAD, HF_BIAS = "model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"
PT_EMBED, PT_HEAD = PT_BACKBONE_PREFIX + HF_EMBED, PT_BACKBONE_PREFIX + HF_HEAD
SPEECH_EMB, DECODER_W, DECODER_B, LLM_EMB = ("speech_embedding.weight", "llm_decoder.weight",
                                             "llm_decoder.bias", "llm_embedding.weight")
# what the sidecar keeps: rows the merged HF layout overwrites or zeroes
SIDE_EMBED_TAIL, SIDE_HEAD_TEXT, SIDE_HEAD_TAIL = ("cosybridge.embed_tokens.tail", "cosybridge.lm_head.text",
                                                  "cosybridge.lm_head.tail")
NEG_INF = float("-inf")


@dataclass(frozen=True)
class Rows:
    source: str
    start: int
    stop: int


@dataclass(frozen=True)
class Fill:
    rows: int
    value: float


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple = ()
    alias_of: str | None = None      # shares the storage of an earlier tensor (.pt only)


@dataclass
class Plan:
    tensors: list[OutTensor] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)   # source name → why it is not written
    notes: list[str] = field(default_factory=list)          # decisions a user should see in the log

    def add(self, name: str, dtype: str, shape: tuple, *pieces, alias_of: str | None = None) -> None:
        self.tensors.append(OutTensor(name, dtype, tuple(shape), tuple(pieces), alias_of))

    def sources(self) -> set[str]:
        return {p.source for t in self.tensors for p in t.pieces if isinstance(p, Rows)}


def _rows(info: TensorInfo) -> int:
    return info.shape[0] if info.shape else 1


def validate(plan: Plan, infos: dict[str, TensorInfo], must_use: set[str] = frozenset()) -> None:
    """Shapes add up, sources exist, names are unique, and every key of must_use is used or dropped."""
    seen: dict[str, OutTensor] = {}
    for t in plan.tensors:
        if t.name in seen:
            raise AssertionError(f"plan writes {t.name} twice")
        if t.alias_of is not None:
            target = seen[t.alias_of]
            assert (target.shape, target.dtype) == (t.shape, t.dtype), f"{t.name}: alias shape/dtype differ"
        else:
            total = 0
            for p in t.pieces:
                if isinstance(p, Rows):
                    if p.source not in infos:
                        raise CheckpointError(f"missing tensor {p.source!r} needed for {t.name}")
                    src = infos[p.source]
                    if not 0 <= p.start <= p.stop <= _rows(src):
                        raise CheckpointError(f"{p.source} has {_rows(src)} rows; {t.name} needs rows "
                                              f"[{p.start}, {p.stop})")
                    if tuple(src.shape[1:]) != tuple(t.shape[1:]):
                        raise CheckpointError(f"{p.source} has rows of shape {list(src.shape[1:])}, "
                                              f"{t.name} needs {list(t.shape[1:])}")
                    total += p.stop - p.start
                else:
                    total += p.rows
            if total != (t.shape[0] if t.shape else 1):
                raise AssertionError(f"plan for {t.name}: pieces give {total} rows, shape says {t.shape}")
        seen[t.name] = t
    unused = sorted(must_use - plan.sources() - set(plan.dropped))
    if unused:
        raise CheckpointError(f"{len(unused)} source tensor(s) would be silently lost: {', '.join(unused[:8])}")


def _out_dtype(dtype: str | None, info: TensorInfo) -> str:
    return dtype or info.dtype


def plan_to_hf(pt: dict[str, TensorInfo], layout: TokenLayout, *, dtype: str | None = None,
               lm_head_tied: bool = True) -> tuple[Plan, Plan]:
    """llm.pt → (merged HF model, sidecar of the rows the HF layout cannot hold)."""
    fam, off, S = layout.family, layout.speech_offset, layout.speech_rows
    V, B = layout.vocab_size, layout.base_rows
    E = pt[PT_EMBED]
    H = E.shape[1]
    emb_dtype = _out_dtype(dtype, E)
    if B < off:
        raise CheckpointError(f"embed_tokens has {B} rows but the tokenizer puts <|s_0|> at {off}")
    model, side = Plan(), Plan()
    for name, info in pt.items():
        if name.startswith(PT_BACKBONE_PREFIX) and name not in (PT_EMBED, PT_HEAD):
            hf = name[len(PT_BACKBONE_PREFIX):]
            model.add(hf, _out_dtype(dtype, info), info.shape, Rows(name, 0, _rows(info)))
    pieces = [Rows(PT_EMBED, 0, off), Rows(SPEECH_EMB, 0, S)]
    if fam.llm_embedding_rows:
        pieces.append(Rows(LLM_EMB, 0, fam.llm_embedding_rows))
    pieces.append(Fill(V - layout.tokenizer_len, 0.0))
    model.tensors.insert(0, OutTensor(HF_EMBED, emb_dtype, (V, H), tuple(pieces)))
    text = Fill(off, 0.0) if fam.lm_head_text_rows == "zero" else Rows(PT_HEAD, 0, off)
    model.add(HF_HEAD, emb_dtype, (V, H), text, Rows(DECODER_W, 0, S), Fill(V - off - S, 0.0))
    if fam.decoder_bias:
        model.add(HF_BIAS, _out_dtype(dtype, pt[DECODER_B]), (V,),
                  Fill(off, NEG_INF), Rows(DECODER_B, 0, S), Fill(V - off - S, NEG_INF))
    # the sidecar: in the HF output's embedding dtype, so to-pt --dtype keep gives one dtype throughout
    if B > off:
        side.add(SIDE_EMBED_TAIL, emb_dtype, (B - off, H), Rows(PT_EMBED, off, B))
    if lm_head_tied:
        model.dropped[PT_HEAD] = "tied to embed_tokens (CosyVoice's Qwen2ForCausalLM ties them)"
    else:
        if fam.lm_head_text_rows == "zero":
            side.add(SIDE_HEAD_TEXT, emb_dtype, (off, H), Rows(PT_HEAD, 0, off))
        # written even with no rows (B == off): its presence is what tells to-pt that lm_head was untied
        side.add(SIDE_HEAD_TAIL, emb_dtype, (B - off, H), Rows(PT_HEAD, off, B))
        model.dropped[PT_HEAD] = "not tied to embed_tokens: its rows the HF layout cannot hold are in the sidecar"
        model.notes.append("llm.model.lm_head.weight differs from embed_tokens; kept in the sidecar")
    validate(model, pt, set(pt) - {PT_HEAD})
    validate(side, pt)
    return model, side


def plan_to_pt(hf: dict[str, TensorInfo], layout: TokenLayout, *, dtype: str | None = None,
               sidecar: dict[str, TensorInfo] | None = None, sidecar_tied: bool = True,
               base: dict[str, TensorInfo] | None = None, base_tied: bool = True) -> Plan:
    """merged HF → llm.pt. Rows the HF layout cannot hold come from the sidecar, else from --base, else
    (upstream's behaviour) from the HF embedding itself."""
    fam, off, S, B = layout.family, layout.speech_offset, layout.speech_rows, layout.base_rows
    plan = Plan()
    if HF_EMBED not in hf:
        raise CheckpointError(f"no {HF_EMBED}: not a Qwen2 Hugging Face checkpoint")
    E = hf[HF_EMBED]
    if E.shape[0] < layout.tokenizer_len:
        raise CheckpointError(f"{HF_EMBED} has {E.shape[0]} rows but the tokenizer needs {layout.tokenizer_len} "
                              f"(<|s_0|> at {off}, {S} speech rows)")
    H = E.shape[1]
    head = HF_HEAD if HF_HEAD in hf else HF_EMBED
    if head == HF_EMBED:
        plan.notes.append("no lm_head.weight stored (tied checkpoint): llm_decoder rows taken from embed_tokens")
    dt = _out_dtype(dtype, E)
    if B < off:
        raise CheckpointError(f"the original model has {B} embedding rows but <|s_0|> is at {off}")
    sidecar, base = sidecar or {}, base or {}
    if SIDE_EMBED_TAIL in sidecar or B == off:
        tail = [Rows(SIDE_EMBED_TAIL, 0, B - off)] if B > off else []
    elif PT_EMBED in base:
        tail = [Rows(PT_EMBED, off, B)]
        plan.notes.append(f"embed_tokens rows {off}..{B - 1} taken from the --base model")
    else:
        tail = [Rows(HF_EMBED, off, B)]
        plan.notes.append(f"no sidecar and no --base: embed_tokens rows {off}..{B - 1} (unused text ids) are "
                          "filled from the HF embedding's speech rows, as upstream does; pass --base MODEL_DIR "
                          "for a bit-identical file")
    if fam.llm_embedding_rows:
        plan.add(LLM_EMB, dt, (fam.llm_embedding_rows, H), Rows(HF_EMBED, off + S, off + S + fam.llm_embedding_rows))
    backbone = sorted((n for n in hf if n.startswith("model.") and n != HF_EMBED), key=qwen2_order)
    plan.add(PT_EMBED, dt, (B, H), Rows(HF_EMBED, 0, off), *tail)
    for name in backbone:
        plan.add(PT_BACKBONE_PREFIX + name, _out_dtype(dtype, hf[name]), hf[name].shape, Rows(name, 0, _rows(hf[name])))
    side_untied = not sidecar_tied and SIDE_HEAD_TAIL in sidecar
    base_untied = not sidecar and not base_tied and PT_HEAD in base
    if side_untied:
        text = Rows(SIDE_HEAD_TEXT, 0, off) if fam.lm_head_text_rows == "zero" else Rows(head, 0, off)
        plan.add(PT_HEAD, dt, (B, H), text, Rows(SIDE_HEAD_TAIL, 0, B - off))
    elif base_untied:
        text = Rows(PT_HEAD, 0, off) if fam.lm_head_text_rows == "zero" else Rows(head, 0, off)
        plan.add(PT_HEAD, dt, (B, H), text, Rows(PT_HEAD, off, B))
    else:
        plan.add(PT_HEAD, dt, (B, H), alias_of=PT_EMBED)
    plan.add(DECODER_W, dt, (S, H), Rows(head, off, off + S))
    if fam.decoder_bias:
        if HF_BIAS in hf:
            plan.add(DECODER_B, _out_dtype(dtype, hf[HF_BIAS]), (S,), Rows(HF_BIAS, off, off + S))
            plan.dropped[HF_BIAS] = "only its speech rows are llm_decoder.bias; the rest is the -inf text mask"
        else:
            plan.add(DECODER_B, dt, (S,), Fill(S, 0.0))
            plan.notes.append("no lm_head.bias in the checkpoint (RL training drops it): llm_decoder.bias written "
                              "as zeros, as upstream does")
    elif HF_BIAS in hf:
        plan.dropped[HF_BIAS] = f"{fam.name} has no llm_decoder bias"
        plan.notes.append(f"lm_head.bias ignored: {fam.name}'s llm_decoder has no bias")
    plan.add(SPEECH_EMB, dt, (S, H), Rows(HF_EMBED, off, off + S))
    if HF_HEAD in hf:
        plan.dropped[HF_HEAD] = "only its speech rows are llm_decoder.weight"
    unknown = sorted(n for n in hf if not n.startswith("model.") and n not in (HF_HEAD, HF_BIAS))
    if unknown:
        raise CheckpointError(f"unexpected tensors outside the Qwen2 model: {', '.join(unknown[:8])}")
    infos = {**hf, **sidecar, **base}
    validate(plan, infos, set(hf))
    return plan


def plan_to_vllm(pt: dict[str, TensorInfo], *, dtype: str | None = "BF16") -> Plan:
    """llm.pt → CosyVoice's speech-only export (export_cosyvoice2_vllm): embed = speech_embedding,
    lm_head = llm_decoder (+ bias), the rest of the backbone as is."""
    plan = Plan()
    se, dw = pt[SPEECH_EMB], pt[DECODER_W]
    plan.add(HF_EMBED, _out_dtype(dtype, se), se.shape, Rows(SPEECH_EMB, 0, se.shape[0]))
    for name, info in pt.items():
        if name.startswith(PT_BACKBONE_PREFIX) and name not in (PT_EMBED, PT_HEAD):
            plan.add(name[len(PT_BACKBONE_PREFIX):], _out_dtype(dtype, info), info.shape, Rows(name, 0, _rows(info)))
    plan.add(HF_HEAD, _out_dtype(dtype, dw), dw.shape, Rows(DECODER_W, 0, dw.shape[0]))
    if DECODER_B in pt:
        plan.add(HF_BIAS, _out_dtype(dtype, pt[DECODER_B]), pt[DECODER_B].shape, Rows(DECODER_B, 0, pt[DECODER_B].shape[0]))
    plan.dropped.update({PT_EMBED: "text embedding is not used by the speech-only model",
                         PT_HEAD: "replaced by llm_decoder"})
    if LLM_EMB in pt:
        plan.dropped[LLM_EMB] = "sos/task_id are fed as embeddings by CosyVoice, not as token ids"
    validate(plan, pt, set(pt))
    return plan

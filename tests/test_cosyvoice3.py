"""CosyVoice3: token ids from the real Qwen2 vocabulary, the merged HF layout, exact round trips, real forward
passes, and the family checks. There is no CosyVoice3LM on PyPI: the reference side is transformers' Qwen2
with the checkpoint's own speech_embedding / llm_decoder, as CosyVoice3LM.inference computes it."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import copy_tree, run_cli, tree_bytes

S = 6561 + 200   # CosyVoice3LM: speech_embedding / llm_decoder rows


@pytest.fixture(scope="module")
def reference_ids(cv3_dir):
    """Ids as upstream's convert_cosyvoice3_to_hf.py builds them with transformers: BlankEN + the
    CosyVoice3 special tokens, then <|s_0|>..<|s_6760|> with four renamed in place."""
    from transformers import AutoTokenizer

    from cosybridge.families import COSYVOICE3

    tok = AutoTokenizer.from_pretrained(cv3_dir / "CosyVoice-BlankEN")
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                            "additional_special_tokens": list(COSYVOICE3.special_tokens)})
    names = [f"<|s_{i}|>" for i in range(S)]
    names[6561:6565] = ["<|sos|>", "<|eos1|>", "<|task_id|>", "<|fill|>"]
    tok.add_tokens(names)
    return tok


def test_ids_from_the_real_vocabulary(reference_ids, cv3_hf):
    tok = reference_ids
    assert tok.convert_tokens_to_ids("<|endofprompt|>") == 151646
    assert tok.convert_tokens_to_ids("<|s_0|>") == 151924
    assert tok.convert_tokens_to_ids("<|eos1|>") == 158486
    assert len(tok) == 151924 + S
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(cv3_hf)
    for name in ("<|s_0|>", "<|s_6560|>", "<|sos|>", "<|eos1|>", "<|task_id|>", "<|fill|>", "<|s_6565|>",
                 "<|s_6760|>", "[ǜ]", "<|endofsystem|>"):
        assert ours.convert_tokens_to_ids(name) == tok.convert_tokens_to_ids(name), name
    text = "You are a helpful assistant.<|endofprompt|>扁担长，板凳宽[breath]<|s_12|>"
    assert ours(text)["input_ids"] == tok(text)["input_ids"]


def test_config_generation_and_metadata(cv3_hf):
    config = json.loads((cv3_hf / "config.json").read_text())
    gen = json.loads((cv3_hf / "generation_config.json").read_text())
    meta = json.loads((cv3_hf / "cosyvoice3_metadata.json").read_text())
    assert config["vocab_size"] == 158720 and config["tie_word_embeddings"] is False
    assert config["eos_token_id"] == 158486
    # CosyVoice3LM stops on any of speech ids 6561..6760; upstream lists only one
    assert gen["eos_token_id"] == list(range(151924 + 6561, 151924 + 6761))
    assert meta["speech_token_offset"] == 151924 and meta["embedding_size"] == S
    assert meta["padded_vocab_size"] == 158720 and meta["eos_token_id"] == 158486
    assert meta["original_vocab_size"] == 151646   # len(BlankEN tokenizer): Qwen2's 151643 + 3 specials


def test_merged_rows(cv3_dir, cv3_hf):
    pt = torch.load(cv3_dir / "llm.pt", weights_only=True)
    assert "llm_embedding.weight" not in pt and "llm_decoder.bias" not in pt
    with safe_open(str(cv3_hf / "model.safetensors"), "pt") as f:
        assert "lm_head.bias" not in f.keys()
        embed, head = f.get_tensor("model.embed_tokens.weight"), f.get_tensor("lm_head.weight")
    off = 151924
    assert torch.equal(embed[:off], pt["llm.model.model.embed_tokens.weight"][:off])
    assert torch.equal(embed[off:off + S], pt["speech_embedding.weight"])
    assert torch.equal(head[:off], pt["llm.model.lm_head.weight"][:off])   # text rows copied, as upstream
    assert torch.equal(head[off:off + S], pt["llm_decoder.weight"])
    assert not embed[off + S:].any() and not head[off + S:].any()          # padding rows are zeros


@pytest.mark.parametrize("variant", ["fp32", "bf16", "untied"])
def test_round_trip_is_bit_identical(variant, tmp_path):
    from cosybridge.synth import build_model_dir

    model = build_model_dir(str(tmp_path / "model"), "cosyvoice3", dtype="BF16" if variant == "bf16" else "F32",
                            tied=variant != "untied", seed=3)
    assert run_cli("to-hf", model, "-o", tmp_path / "hf").returncode == 0
    r = run_cli("to-pt", tmp_path / "hf", "-o", tmp_path / "llm.pt")
    assert r.returncode == 0, r.stderr
    a = torch.load(f"{model}/llm.pt", weights_only=True)
    b = torch.load(tmp_path / "llm.pt", weights_only=True)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    tied = b["llm.model.lm_head.weight"].untyped_storage().data_ptr() == \
        b["llm.model.model.embed_tokens.weight"].untyped_storage().data_ptr()
    assert tied == (variant != "untied")


def _cv3_lm_logits(model_dir, ids_text, speech):
    """CosyVoice3LM.inference's first step: [sos, text, task_id, prompt speech] → llm_decoder(hidden)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    pt = torch.load(model_dir / "llm.pt", weights_only=True)
    config = json.loads((model_dir / "CosyVoice-BlankEN" / "config.json").read_text())
    qwen = Qwen2ForCausalLM(Qwen2Config(**config)).eval()
    qwen.load_state_dict({k.removeprefix("llm.model."): v for k, v in pt.items() if k.startswith("llm.model.")})
    se = pt["speech_embedding.weight"]
    emb = torch.cat([se[6561:6562], qwen.model.embed_tokens.weight[ids_text], se[6563:6564], se[speech]])
    with torch.no_grad():
        hidden = qwen(inputs_embeds=emb[None], output_hidden_states=True).hidden_states[-1]
    return hidden[0] @ pt["llm_decoder.weight"].T


def test_forward_equivalence(cv3_dir, cv3_hf, reference_ids):
    from transformers import AutoModelForCausalLM

    text = reference_ids("You are a helpful assistant.<|endofprompt|>Hello there")["input_ids"]
    assert 151646 in text
    speech = [5, 17, 6000, 42]
    want = _cv3_lm_logits(cv3_dir, text, speech)
    hf = AutoModelForCausalLM.from_pretrained(cv3_hf, dtype=torch.float32).eval()
    off = 151924
    ids = [off + 6561] + text + [off + 6563] + [off + s for s in speech]
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0, :, off:off + S]
    diff = (got - want).abs().max().item()
    print(f"CosyVoice3 fp32 max |Δ logit| HF vs reference: {diff:.3g}")
    assert diff <= 1e-5


def test_family_mismatch_is_refused(cv3_dir, tmp_path):
    model = copy_tree(cv3_dir, tmp_path / "model")
    (model / "cosyvoice3.yaml").rename(model / "cosyvoice2.yaml")
    text = (model / "cosyvoice2.yaml").read_text().replace("CosyVoice3LM", "Qwen2LM")
    (model / "cosyvoice2.yaml").write_text(text)
    before = tree_bytes(model)
    r = run_cli("to-hf", model, "-o", tmp_path / "hf")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "cosyvoice3 checkpoint but cosyvoice2.yaml names Qwen2LM" in r.stderr
    assert not (tmp_path / "hf").exists() and tree_bytes(model) == before
    r = run_cli("to-hf", cv3_dir, "-o", tmp_path / "hf", "--family", "cosyvoice2")
    assert r.returncode == 1 and "--family cosyvoice2" in r.stderr


@pytest.mark.parametrize("family", ["cosyvoice2", "cosyvoice3"])
def test_to_vllm(family, request, tmp_path):
    from transformers import AutoModelForCausalLM

    from cosybridge.hfdir import fingerprint
    from cosybridge.io.pt_io import PtFile

    model = copy_tree(request.getfixturevalue("cv2_dir" if family == "cosyvoice2" else "cv3_dir"), tmp_path / "model")
    r = run_cli("to-vllm", model)
    assert r.returncode == 0, r.stderr
    out = model / "vllm"
    config = json.loads((out / "config.json").read_text())
    rows = 6564 if family == "cosyvoice2" else S
    assert config["vocab_size"] == rows and config["tie_word_embeddings"] is False
    assert "bos_token_id" not in config and "eos_token_id" not in config
    assert config["architectures"] == ["CosyVoice2ForCausalLM" if family == "cosyvoice2" else "Qwen2ForCausalLM"]
    with PtFile(str(model / "llm.pt")) as pt:
        assert config["cosybridge_source"]["fingerprint"] == fingerprint(pt)
    src = torch.load(model / "llm.pt", weights_only=True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), src["speech_embedding.weight"].bfloat16())
        assert torch.equal(f.get_tensor("lm_head.weight"), src["llm_decoder.weight"].bfloat16())
        assert ("lm_head.bias" in f.keys()) == (family == "cosyvoice2")
        if family == "cosyvoice2":
            assert torch.equal(f.get_tensor("lm_head.bias"), src["llm_decoder.bias"].bfloat16())
        else:
            hf = AutoModelForCausalLM.from_pretrained(out)
            assert torch.equal(hf.lm_head.weight, src["llm_decoder.weight"].bfloat16())
            assert torch.equal(hf.model.layers[1].mlp.down_proj.weight,
                               src["llm.model.model.layers.1.mlp.down_proj.weight"].bfloat16())
    # a second export without --force is refused: CosyVoice would silently reuse the first
    r = run_cli("to-vllm", model)
    assert r.returncode == 1 and "already exists" in r.stderr


def test_vllm_export_fingerprint_changes_with_llm_pt(cv2_dir, tmp_path):
    """The record that lets inspect call an export stale: a replaced llm.pt has another fingerprint."""
    from cosybridge.hfdir import fingerprint
    from cosybridge.io.pt_io import PtFile
    from cosybridge.synth import TINY, write_llm_pt
    from cosybridge.families import COSYVOICE2

    model = copy_tree(cv2_dir, tmp_path / "model")
    assert run_cli("to-vllm", model).returncode == 0
    recorded = json.loads((model / "vllm" / "config.json").read_text())["cosybridge_source"]["fingerprint"]
    write_llm_pt(str(model / "llm.pt"), COSYVOICE2, TINY, seed=99)
    with PtFile(str(model / "llm.pt")) as pt:
        assert fingerprint(pt) != recorded
    shutil.rmtree(model / "vllm")

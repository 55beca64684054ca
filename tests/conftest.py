"""Shared fixtures: tiny real-architecture CosyVoice model directories (real Qwen2 vocabulary), the real
CosyVoice `Qwen2LM` from token2wav-cosyvoice, and a CLI runner.

Session-scoped fixtures are read-only by convention: a test that modifies files copies them first
(`copy_tree`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


@pytest.fixture(scope="session")
def cv2_dir(tmp_path_factory) -> Path:
    """A CosyVoice2 model dir: llm.pt (fp32, tied lm_head), cosyvoice2.yaml, CosyVoice-BlankEN/."""
    from cosybridge.synth import build_model_dir

    return Path(build_model_dir(str(tmp_path_factory.mktemp("cv2") / "model"), "cosyvoice2"))


@pytest.fixture(scope="session")
def cv3_dir(tmp_path_factory) -> Path:
    from cosybridge.synth import build_model_dir

    return Path(build_model_dir(str(tmp_path_factory.mktemp("cv3") / "model"), "cosyvoice3"))


@pytest.fixture(scope="session")
def cv2_hf(cv2_dir, tmp_path_factory) -> Path:
    """cv2_dir converted by `to_hf` (fp32, with sidecar)."""
    from cosybridge.convert import to_hf

    out = tmp_path_factory.mktemp("cv2hf") / "hf"
    to_hf(str(cv2_dir), str(out))
    return out


@pytest.fixture(scope="session")
def cv3_hf(cv3_dir, tmp_path_factory) -> Path:
    from cosybridge.convert import to_hf

    out = tmp_path_factory.mktemp("cv3hf") / "hf"
    to_hf(str(cv3_dir), str(out))
    return out


@pytest.fixture(scope="session")
def exported(tmp_path_factory, cv2_dir, cv3_dir) -> dict:
    """Copies of both model dirs with `to_vllm` written into <model_dir>/vllm (read-only, like the rest)."""
    from cosybridge.vllm_export import to_vllm

    out = {}
    for family, d in (("cosyvoice2", cv2_dir), ("cosyvoice3", cv3_dir)):
        out[family] = copy_tree(d, tmp_path_factory.mktemp("vllm") / "model")
        to_vllm(str(out[family]))
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file under path → its bytes, to prove an input was not touched."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def load_cosyvoice_llm_module():
    """CosyVoice's real cosyvoice/llm/llm.py (token2wav-cosyvoice). It imports torchaudio at the top, which
    has no build for this torch: import transformers first, then stub torchaudio, then import it."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        pytest.skip("transformers is not installed")
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    try:
        import cosyvoice.llm.llm as llm_module
    except ImportError as e:
        pytest.skip(f"token2wav-cosyvoice is not installed ({e}); run `make setup`")
    return llm_module


def real_qwen2lm(model_dir: Path):
    """CosyVoice's Qwen2LM built around a Qwen2ForCausalLM with the BlankEN config of model_dir."""
    import json

    from transformers import Qwen2Config, Qwen2ForCausalLM

    llm_module = load_cosyvoice_llm_module()
    config = json.loads((Path(model_dir) / "CosyVoice-BlankEN" / "config.json").read_text())
    encoder = llm_module.Qwen2Encoder.__new__(llm_module.Qwen2Encoder)
    import torch

    torch.nn.Module.__init__(encoder)
    encoder.model = Qwen2ForCausalLM(Qwen2Config(**config))  # from_pretrained would need weights on disk
    return llm_module.Qwen2LM(config["hidden_size"], config["hidden_size"], 6561, encoder, sampling=None).eval()


def run_cli(*args, cwd=None, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m cosybridge ARGS` in a subprocess against this checkout's src/."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "cosybridge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)

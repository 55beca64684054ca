"""cosybridge: exact, streaming conversion of CosyVoice2/3 speech-LLM checkpoints.

    from cosybridge import to_hf, to_pt, to_vllm
    report = to_hf("pretrained_models/CosyVoice2-0.5B", "cosyvoice2_hf")
    report = to_pt("checkpoints/global_step_400/merged_hf_model", "llm.pt")

The converters return a Report (tensors, bytes, seconds, layout, notes); inspect_path(path) and
verify(a, b) return the dicts that `--json` prints. All raise CheckpointError for bad input. Names load lazily so `import cosybridge` (and `cosybridge --help`) does not import torch.
"""
from __future__ import annotations

from .errors import CheckpointError

__version__ = "0.1.0"
_LAZY = {
    "to_hf": "convert", "to_pt": "convert", "Report": "convert",
    "to_vllm": "vllm_export",
    "inspect_path": "inspect", "verify": "verification",
}
__all__ = ["CheckpointError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cosybridge' has no attribute {name!r}")

"""A CosyVoice model directory: llm.pt, the hyperpyyaml config and CosyVoice-BlankEN/, read without CosyVoice.

The yaml uses hyperpyyaml tags (`!new:`, `!ref`, `!apply:`, `!name:`) that would import and run code;
we parse it with PyYAML's SafeLoader and keep each tag as inert data.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import yaml

from .errors import CheckpointError
from .families import FAMILY_BY_CLASS, FAMILY_BY_YAML, Family

BLANKEN = "CosyVoice-BlankEN"
LLM_PT = "llm.pt"


@dataclass(frozen=True)
class Tagged:
    tag: str
    value: object


class _InertLoader(yaml.SafeLoader):
    """SafeLoader that keeps hyperpyyaml's tags as Tagged values instead of failing or executing them."""


def _tagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged(suffix, value)


_InertLoader.add_multi_constructor("!", _tagged)
_REF = re.compile(r"^<([\w.]+)>$")


def read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_InertLoader)  # noqa: S506 - inert loader, no code runs
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping at the top level")
    return data


def _resolve(value, top: dict):
    """Follow `!ref <name>` to a top-level value (the only kind the llm section uses)."""
    if isinstance(value, Tagged) and value.tag == "ref" and isinstance(value.value, str):
        m = _REF.match(value.value.strip())
        if m and m.group(1) in top:
            return _resolve(top[m.group(1)], top)
    return value


@dataclass(frozen=True)
class LLMConfig:
    """The `llm:` section of the yaml: what CosyVoice will instantiate and with which sizes."""

    lm_class: str
    speech_token_size: int
    llm_input_size: int | None
    llm_output_size: int | None
    path: str

    @property
    def family(self) -> Family | None:
        return FAMILY_BY_CLASS.get(self.lm_class)


def read_llm_config(path: str) -> LLMConfig:
    top = read_yaml(path)
    llm = top.get("llm")
    if not isinstance(llm, Tagged) or not llm.tag.startswith("new:") or not isinstance(llm.value, dict):
        raise CheckpointError(f"{path}: no `llm: !new:cosyvoice.llm.llm.<class>` section")
    args = {k: _resolve(v, top) for k, v in llm.value.items()}

    def int_or_none(key):
        v = args.get(key)
        return v if isinstance(v, int) else None

    size = int_or_none("speech_token_size")
    if size is None:
        raise CheckpointError(f"{path}: the llm section has no integer speech_token_size")
    return LLMConfig(llm.tag.removeprefix("new:").rsplit(".", 1)[-1], size,
                     int_or_none("llm_input_size"), int_or_none("llm_output_size"), path)


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class ModelDir:
    path: str
    llm_pt: str
    yaml_path: str
    llm: LLMConfig
    blanken: str
    qwen_config: dict

    @property
    def family(self) -> Family:
        return self.llm.family

    @property
    def inputs(self) -> list[str]:
        """The files a conversion reads: an output may sit beside them (MODEL_DIR/hf_merged) but never on them."""
        return [self.llm_pt, self.yaml_path, self.blanken]


def read_model_dir(path: str) -> ModelDir:
    """Find and read the pieces of a CosyVoice model directory; every missing piece is named."""
    path = str(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a CosyVoice model directory with "
                              f"{LLM_PT}, cosyvoice2.yaml or cosyvoice3.yaml, and {BLANKEN}/)")
    yamls = [n for n in FAMILY_BY_YAML if os.path.exists(os.path.join(path, n))]
    missing = [n for n in (LLM_PT, BLANKEN) if not os.path.exists(os.path.join(path, n))]
    if not yamls:
        missing.append("cosyvoice2.yaml or cosyvoice3.yaml")
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}; not a CosyVoice2/3 model directory")
    if len(yamls) > 1:
        raise CheckpointError(f"{path}: has both {' and '.join(yamls)}; keep the one that matches llm.pt")
    yaml_path = os.path.join(path, yamls[0])
    llm = read_llm_config(yaml_path)
    if llm.family is None:
        raise CheckpointError(f"{yaml_path}: llm class {llm.lm_class} is not supported "
                              f"(supported: {', '.join(FAMILY_BY_CLASS)})")
    if llm.family is not FAMILY_BY_YAML[yamls[0]]:
        raise CheckpointError(f"{yaml_path}: names {llm.lm_class}, which is {llm.family.name}, "
                              f"but the file name says {FAMILY_BY_YAML[yamls[0]].name}")
    blanken = os.path.join(path, BLANKEN)
    config = read_json(os.path.join(blanken, "config.json"))
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if not isinstance(config.get(key), int):
            raise CheckpointError(f"{blanken}/config.json: missing integer {key}")
    for key in ("llm_input_size", "llm_output_size"):
        value = getattr(llm, key)
        if value is not None and value != config["hidden_size"]:
            raise CheckpointError(f"{yaml_path}: {key} is {value} but {BLANKEN}/config.json has "
                                  f"hidden_size {config['hidden_size']}")
    return ModelDir(path, os.path.join(path, LLM_PT), yaml_path, llm, blanken, config)

"""Hugging Face weight files: one `model.safetensors`, or shards with `model.safetensors.index.json`.

Reading cross-checks the index against the shards' own headers, as llama.cpp's converter does. Writing
plans shards with a pure function (sizes in, file names out), like huggingface_hub's split_torch_state_dict.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..errors import CheckpointError
from .safetensors_io import SafetensorsFile
from .source import TensorInfo

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_MIXED = "the index and the shards come from different saves: copy the whole checkpoint directory again"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9._-]+\.safetensors$")


class HFWeights:
    """All tensors of an HF directory as one source, opening each shard's header once."""

    def __init__(self, directory: str):
        self.path = str(directory)
        single, index = os.path.join(self.path, SINGLE), os.path.join(self.path, INDEX)
        self.files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        try:
            if os.path.exists(index):
                self._open_index(index)
            elif os.path.exists(single):
                f = self.files[SINGLE] = SafetensorsFile(single)
                self._where = dict.fromkeys(f.names(), f)
            else:
                raise CheckpointError(f"{self.path}: no {SINGLE} and no {INDEX}; not a Hugging Face model directory")
        except BaseException:
            self.close()
            raise

    def _open_index(self, index: str) -> None:
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            weight_map = None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object)")
        bad = sorted({repr(v) for v in weight_map.values() if not isinstance(v, str) or not _SHARD_NAME.match(v)})
        if bad:
            raise CheckpointError(f"{index}: shard name {bad[0]} must be a plain *.safetensors file name")
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(self.path, shard)
            if not os.path.exists(path):
                missing = sorted(k for k, v in weight_map.items() if v == shard)
                raise CheckpointError(f"{index}: shard {shard} is missing ({len(missing)} tensors, e.g. {missing[0]}); "
                                      "copy or download every shard the index names")
            self.files[shard] = SafetensorsFile(path)
        for shard, f in self.files.items():
            listed = {k for k, v in weight_map.items() if v == shard}
            present = set(f.names())
            if listed - present:
                raise CheckpointError(f"{f.path}: tensors in the index but not in the shard: {sorted(listed - present)[:5]}; "
                                      f"{_MIXED}")
            if present - listed:
                raise CheckpointError(f"{f.path}: tensors in the shard but not in the index: {sorted(present - listed)[:5]}; "
                                      f"{_MIXED}")
            for name in f.names():  # header order, not a set's: to-pt writes keys in the order they are read
                self._where[name] = f

    def names(self) -> list[str]:
        return list(self._where)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        return self._file(name).info(name)

    def read(self, name: str, start: int = 0, stop: int | None = None, out=None):
        return self._file(name).read(name, start, stop, out=out)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class ShardPlan:
    files: dict[str, list[str]]       # file name → tensor names, in write order
    total_size: int

    @property
    def index(self) -> dict | None:
        if len(self.files) == 1:
            return None
        return {"metadata": {"total_size": self.total_size},
                "weight_map": {n: f for f, names in self.files.items() for n in names}}


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> ShardPlan:
    """Greedy in order, as huggingface_hub does: a tensor larger than the limit gets a shard of its own."""
    groups: list[list[str]] = [[]]
    current = 0
    for name, size in sizes:
        if groups[-1] and current + size > max_shard_size:
            groups.append([])
            current = 0
        groups[-1].append(name)
        current += size
    total = sum(s for _, s in sizes)
    if len(groups) == 1:
        return ShardPlan({SINGLE: groups[0]}, total)
    n = len(groups)
    return ShardPlan({f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}, total)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.I)


def parse_size(text: str) -> int:
    """'5GB' → 5 * 10**9, '500MiB' → 500 * 2**20 (Hugging Face's convention for max_shard_size)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"invalid size {text!r}; use e.g. 5GB, 500MB or 2GiB")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base ** power)

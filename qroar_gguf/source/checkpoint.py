"""A Hugging Face checkpoint on disk: config, tokenizer files and (possibly sharded) safetensors.

`open_checkpoint` accepts what users point at: a `.safetensors` file, a
`model.safetensors.index.json`, or the checkpoint directory. Tensors stay on disk until `load`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qroar_gguf.errors import QroarError
from qroar_gguf.source.safetensors_lazy import SafetensorsFile, StoredTensor

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Checkpoint:
    directory: Path
    config: dict
    shards: list[SafetensorsFile]
    index: dict[str, SafetensorsFile] = field(default_factory=dict)  # tensor name -> shard holding it

    @property
    def names(self) -> list[str]:
        return list(self.index)

    def info(self, name: str) -> StoredTensor:
        return self.index[name].tensors[name]

    def load(self, name: str) -> np.ndarray:
        return self.index[name].load(name)

    @property
    def source_files(self) -> list[Path]:
        """Every file this checkpoint reads: an output must never overwrite one of them."""
        files = [s.path for s in self.shards] + [self.directory / "config.json"]
        files += [self.directory / n for n in (*TOKENIZER_FILES, "tokenizer_config.json", "model.safetensors.index.json")]
        return [f for f in files if f.exists()]

    @property
    def source_dtype(self) -> str:
        """The dtype of the 2-D weights (F16, BF16 or F32): it decides the intermediate GGUF type."""
        kinds = {self.info(n).dtype for n in self.names if len(self.info(n).shape) == 2}
        for dtype in ("F32", "BF16", "F16"):
            if dtype in kinds:
                return dtype
        raise QroarError(f"{self.directory}: no float16/bfloat16/float32 weight matrices found")


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise QroarError(f"{path} does not exist")
    if path.is_dir():
        directory = path
        shard_paths = _shards_of_directory(directory)
    elif path.name.endswith(".index.json"):
        directory = path.parent
        shard_paths = _shards_of_index(path)
    elif path.suffix == ".safetensors":
        directory = path.parent
        shard_paths = [path]
    else:
        raise QroarError(f"{path}: expected a .safetensors file, a model.safetensors.index.json or a checkpoint "
                         "directory (convert .bin/.pt checkpoints to safetensors first)")

    config = _read_config(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise QroarError(f"{directory} has no tokenizer (tokenizer.json or tokenizer.model): copy the model's "
                         "tokenizer files next to its config.json")

    shards = [SafetensorsFile(p) for p in shard_paths]
    index: dict[str, SafetensorsFile] = {}
    for shard in shards:
        for name in shard.tensors:
            if name in index:
                raise QroarError(f"tensor {name!r} appears in both {index[name].path.name} and {shard.path.name}")
            index[name] = shard
    if not index:
        raise QroarError(f"{path} holds no tensors")
    return Checkpoint(directory=directory, config=config, shards=shards, index=index)


def _read_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise QroarError(f"{directory} has no config.json: put the model's config.json next to its weights")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise QroarError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise QroarError(f"{config_path} is not a JSON object: restore the model's own config.json")
    # Multimodal wrappers keep the language model's settings under text_config.
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    return config


def _shards_of_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as exc:
        raise QroarError(f"{index_path} is not a valid safetensors index ({exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise QroarError(f"{index_path} is not a valid safetensors index (weight_map must map names to files)")
    shard_paths = [index_path.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [p.name for p in shard_paths if not p.is_file()]
    if missing:
        raise QroarError(f"{index_path} names shards that are missing: {', '.join(missing)}")
    return shard_paths


def _shards_of_directory(directory: Path) -> list[Path]:
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        return _shards_of_index(index_path)
    shard_paths = sorted(directory.glob("*.safetensors"))
    if not shard_paths:
        raise QroarError(f"{directory} holds no .safetensors files")
    return shard_paths

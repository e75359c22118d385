"""The model families, by the Hugging Face architecture names they convert and the GGUF arches they answer for.

Like llama.cpp's converter registry (``ModelBase.register``): each family module under arch/ registers its
class with ``arch.base.register``; this module imports every one of them (a new family is a new module,
found here without an edit) and answers the lookups: ``family_for`` a config.json, ``gguf_family`` for a
GGUF arch, ``refusal`` for an arch `patch` does not extend.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import gguf

from qroar_gguf.arch import base
from qroar_gguf.arch.base import GgufFamily, ModelFamily, config_architectures, unsupported
from qroar_gguf.source.checkpoint import open_checkpoint

#: Modules of arch/ that hold no family (the vocabulary is heavy to import and needed by convert only).
_NOT_FAMILIES = {"base", "families", "vocab", "pretokenizer", "temperature"}


def _load_families() -> None:
    package = Path(__file__).parent
    for info in pkgutil.iter_modules([str(package)]):
        if info.name not in _NOT_FAMILIES:
            importlib.import_module(f"{__package__}.{info.name}")


_load_families()


def supported_architectures() -> tuple[str, ...]:
    """The Hugging Face architectures `convert` takes, in registration order."""
    return tuple(base.registered_hf())


def checkpoint_hparams(path: str | Path):
    """The validated hyperparameters of the checkpoint at `path` (reads config.json and headers only)."""
    return family_for(open_checkpoint(path).config).hparams


def family_for(config: dict) -> ModelFamily:
    """The family that converts this config.json, with its validated hyperparameters."""
    archs = config_architectures(config)
    table = base.registered_hf()
    for name in archs:
        if isinstance(name, str) and name in table:
            return table[name](config)
    raise unsupported(config, archs, supported_architectures())


def gguf_family(arch: object) -> type[GgufFamily] | None:
    """The family answering for GGUF arch ``arch`` (general.architecture), None when none does."""
    return base.registered_gguf().get(arch) if isinstance(arch, str) else None


def patched_arches() -> dict[str, tuple[str, ...]]:
    """Pair route -> the GGUF arches `patch` extends through it (in stock runtimes)."""
    routes: dict[str, tuple[str, ...]] = {}
    for arch, family in base.registered_gguf().items():
        if family.pair_route is not None:
            route = "rewritten" if family.rewrite_as else family.pair_route
            routes[route] = routes.get(route, ()) + (arch,)
    return routes


def refusal(arch: str) -> str:
    """The one line that says why a file of ``arch`` cannot be patched."""
    family = gguf_family(arch)
    if family is not None and family.refusal is not None:
        return f"{arch} {family.refusal}"
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        return f"GGUF arch {arch} is unknown to the pinned llama.cpp, which would not load the file"
    routes = patched_arches()
    through = {"rope_freqs": "rope_freqs.weight", "rope_factors": "rope_factors_long/short",
               "keys": "llama.cpp's rope keys"}
    parts = [f"{', '.join(routes[route])} ({what})" for route, what in through.items() if routes.get(route)]
    rewritten = ", ".join(f"{a} as {gguf_family(a).rewrite_as}" for a in routes.get("rewritten", ()))
    return (f"qroar-gguf patches GGUF arch {', '.join(parts)} and rewrites {rewritten}; llama.cpp runs {arch} "
            "with RoPE, but qroar-gguf does not patch it yet")

"""Latent and text-embedding caching: model inputs that do not change as training goes, content-hashed.

A family asks `get(kind, key, compute)` for what it may cache (Family.cacheable; opted into with
`cache_latents` / `cache_text_embeddings`). The key is a content hash the family builds: for latents
the exact pixels that go into the VAE (so the crop and flip) and the VAE's weights, for text the
caption and the encoders' weights. Entries live in memory, and under `cache/<kind>/<key>.safetensors`
in the output store, uploaded in the background; a resumed attempt reads them from there instead of
encoding again. An entry is computed the same way whichever attempt computes it, so exact resume holds.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_trainer.errors import ConfigError
from lora_trainer.storage import Store

CACHE_DIR = "cache"


def content_key(*parts: bytes | str) -> str:
    """sha256 over the parts (length-prefixed, so parts cannot run into each other)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The exact bytes of a tensor, with its dtype and shape."""
    t = tensor.detach().to("cpu").contiguous()
    return f"{t.dtype}{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes()


def module_key(module: torch.nn.Module) -> str:
    """A content hash of a module's weights (names, dtypes, shapes and bytes), memoised on it."""
    cached = getattr(module, "_lora_cache_key", None)
    if cached is None:
        cached = content_key(*(x for name, p in sorted(module.state_dict().items())
                               for x in (name, tensor_bytes(p))))
        module._lora_cache_key = cached
    return cached


def cache_kinds(cache_latents: bool, cache_text: bool, cacheable: frozenset[str]) -> frozenset[str]:
    """What to cache: what the config asks for, which the family must allow (pure; ConfigError else)."""
    asked = {k for k, on in (("latents", cache_latents), ("text", cache_text)) if on}
    if "text" in asked - cacheable:
        raise ConfigError(
            "cache_text_embeddings: true, but the text encoders are trained (train_text_encoder: true), so their "
            "outputs change as training goes; set cache_text_embeddings: false or train_text_encoder: false"
        )
    if asked - cacheable:
        raise ConfigError(f"cache_latents: true, but this model family cannot cache {', '.join(sorted(asked - cacheable))}")
    return frozenset(asked)


class EncodeCache:
    """Model inputs by (kind, content key): memory, then the output store, then `compute`."""

    def __init__(self, kinds: frozenset[str], store: Store, scratch: Path,
                 upload: Callable[[str, Path], None]):
        self.kinds = kinds
        self.store = store
        self.scratch = scratch
        self.upload = upload  # (store key, local file): queues a background upload
        self.memory: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self.computed: Counter[str] = Counter()
        self.loaded: Counter[str] = Counter()

    def get(self, kind: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The cached tensors of `key`, or `compute()`'s (then stored); device as computed or on CPU."""
        if (kind, key) in self.memory:
            return self.memory[(kind, key)]
        name = f"{CACHE_DIR}/{kind}/{key}.safetensors"
        local = self.scratch / name
        if self.store.exists(name):
            self.store.get_file(name, local)
            tensors = load_file(str(local))
            self.loaded[kind] += 1
        else:
            tensors = {k: v.detach() for k, v in compute().items()}
            local.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.to("cpu").contiguous() for k, v in tensors.items()}, str(local))
            tensors = load_file(str(local))  # what a later attempt reads: the same bytes from here on
            self.upload(name, local)
            self.computed[kind] += 1
        self.memory[(kind, key)] = tensors
        return tensors

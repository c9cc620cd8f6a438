"""Bounded LRU caches for a worker: ControlNet adapters, condition latents and prompt embeddings."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, PixArtAlphaPipeline

    from models.controlnet import PixArtControlNetAdapter
    from models.hed import HEDNetwork

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_IDENTITY_ATTR = "_farm_cache_identity"


def model_identity(module: Any) -> str:
    """Return a key naming this loaded module instance: its source, dtype and a token unique to the object."""
    # id() can be reused by a later model once this one is freed, which would serve stale entries;
    # a token stored on the object cannot.
    token = getattr(module, _IDENTITY_ATTR, None)
    if token is None:
        token = uuid.uuid4().hex[:12]
        setattr(module, _IDENTITY_ATTR, token)
    config = getattr(module, "config", None)
    source = getattr(module, "name_or_path", None) or getattr(config, "_name_or_path", None) or type(module).__name__
    return f"{source}|{getattr(module, 'dtype', '')}|{token}"


class LRUCache(Generic[K, V]):
    """A bounded least-recently-used map counting hits, misses and evictions; evictions are logged."""

    def __init__(self, max_entries: int, *, name: str = "cache") -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.name = name
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[K, V] = OrderedDict()
        # Workers render on one thread but upload on others; the lock keeps the counters and order consistent.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def cached_keys(self) -> list[K]:
        """The cached keys, least recently used first (a snapshot)."""
        with self._lock:
            return list(self._entries)

    def get(self, key: K) -> V | None:
        """Return the value for `key` (a hit, now most recent) or None (a miss)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
            return None

    def put(self, key: K, value: V) -> None:
        """Store `value`, evicting the least recently used entries beyond the bound."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                evicted, _ = self._entries.popitem(last=False)
                self.evictions += 1
                logger.info("%s: evicted %r (%d entries, bound %d)", self.name, evicted, len(self), self.max_entries)

    def get_or_create(self, key: K, factory: Callable[[], V]) -> V:
        """Return the cached value, or build it with `factory` (outside the lock) and cache it."""
        value = self.get(key)
        if value is None:
            value = factory()
            self.put(key, value)
        return value

    def clear(self) -> None:
        """Drop every entry; the counters keep their totals."""
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict[str, Any]:
        """Return counters and the hit rate (None before the first lookup)."""
        lookups = self.hits + self.misses
        return {
            "name": self.name,
            "entries": len(self),
            "max_entries": self.max_entries,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "hit_rate": self.hits / lookups if lookups else None,
        }


class AdapterCache(LRUCache[tuple[str, str], "PixArtControlNetAdapter"]):
    """Loaded ControlNet adapters keyed by (name, dtype)."""

    def __init__(self, max_entries: int = 2) -> None:
        super().__init__(max_entries, name="controlnet-adapters")

    def get_or_load(
        self, name: str, dtype: torch.dtype, loader: Callable[[], PixArtControlNetAdapter]
    ) -> PixArtControlNetAdapter:
        """Return the adapter `name` in `dtype`, calling `loader` on a miss."""
        return self.get_or_create((name, str(dtype)), loader)


class ConditionLatentCache(LRUCache[tuple[str, str, int, int], "torch.Tensor"]):
    """Condition latents keyed by (image sha256, VAE identity, width, height)."""

    def __init__(self, max_entries: int = 256) -> None:
        super().__init__(max_entries, name="condition-latents")

    def latents(self, path: str | Path, vae: AutoencoderKL, width: int, height: int) -> torch.Tensor:
        """Return 1×C×h×w latents for the image at `path`, encoding it only on a miss."""
        from models.conditions import image_sha256

        return self.latents_for(image_sha256(path), lambda: path, vae, width, height)

    def latents_for(
        self,
        sha256: str,
        fetch: Callable[[], str | Path],
        vae: AutoencoderKL,
        width: int,
        height: int,
        *,
        hed: HEDNetwork | None = None,
        preprocess: str | None = None,
    ) -> torch.Tensor:
        """Like latents(), keyed by a known sha256: a hit reads no file; `fetch` gives the image's path on a miss.

        With `hed` the image is first turned into HED soft edges; `preprocess` ("hed:<weights sha256>") keys them.
        """
        from models.conditions import encode_condition, load_condition_image

        source = sha256 if preprocess is None else f"{sha256}|{preprocess}"
        key = (source, model_identity(vae), width, height)
        return self.get_or_create(
            key, lambda: encode_condition(vae, load_condition_image(fetch()), width, height, hed=hed)
        )


class PromptEmbeddingCache(LRUCache[tuple[str, str], "tuple[torch.Tensor, torch.Tensor]"]):
    """T5 prompt embeddings and attention masks keyed by (model identity, prompt)."""

    def __init__(self, max_entries: int = 1024) -> None:
        super().__init__(max_entries, name="prompt-embeddings")

    def embed(
        self,
        pipe: PixArtAlphaPipeline,
        prompts: Sequence[str],
        *,
        model_key: str | None = None,
        max_sequence_length: int = 120,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return stacked (embeds, mask) for `prompts`, running T5 once for the distinct prompts not cached."""
        import torch

        from models.quantize import encode_prompts

        if not prompts:
            raise ValueError("embed needs at least one prompt")
        key_model = model_key if model_key is not None else model_identity(pipe.text_encoder)
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        missing: list[str] = []
        for prompt in prompts:
            if prompt in found or prompt in missing:
                # A repeat within this batch is served by the one encoder call below: count it as a hit.
                with self._lock:
                    self.hits += 1
                continue
            entry = self.get((key_model, prompt))
            if entry is None:
                missing.append(prompt)
            else:
                found[prompt] = entry
        if missing:
            embeds, mask = encode_prompts(pipe, missing, max_sequence_length=max_sequence_length)
            for index, prompt in enumerate(missing):
                entry = (embeds[index : index + 1].clone(), mask[index : index + 1].clone())
                self.put((key_model, prompt), entry)
                found[prompt] = entry
        return (
            torch.cat([found[prompt][0] for prompt in prompts]),
            torch.cat([found[prompt][1] for prompt in prompts]),
        )

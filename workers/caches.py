"""What a worker keeps loaded between tasks: pipelines, ControlNet adapters, condition latents, prompt embeddings.

Every cache is bounded and counts hits, misses and evictions; the counters are logged after each task and
at shutdown.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from farm.job import Claimed
from farm.profiles import controlnet_source, model_source
from farm.settings import Settings
from farm.storage import Storage

log = logging.getLogger("farm.worker")


@dataclass
class PipelineCache:
    """Loaded pipelines keyed by (model, quantization), least recently used evicted beyond `capacity`."""

    settings: Settings
    capacity: int = 1
    low_memory: bool = False
    loaded: OrderedDict[tuple[str, str | None], Any] = field(default_factory=OrderedDict)
    # 8-bit T5s kept beside their pipelines (not inside: the pipeline would cast embeddings to their fp16).
    encoders: dict[tuple[str, str | None], Any] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def get(self, model: str, quantize: str | None = None) -> Any:
        """The pipeline for a job's model and quantization, loading it on first use (never at import)."""
        key = (model, quantize)
        if key in self.loaded:
            self.hits += 1
            self.loaded.move_to_end(key)
            return self.loaded[key]
        self.misses += 1
        # Evict first: on a GPU the old pipeline must leave before the new one fits.
        while len(self.loaded) >= self.capacity:
            evicted, _ = self.loaded.popitem(last=False)
            self.encoders.pop(evicted, None)
            self.evictions += 1
            log.info("pipeline cache: evicted %s (%s)", evicted, self.stats())
        source = model_source(model, self.settings)
        started = time.perf_counter()
        pipe = self._load(key, source, quantize)
        log.info(
            "loaded model %s (quantize=%s, low_memory=%s) from %s in %.1f s",
            model,
            quantize,
            self.low_memory,
            source,
            time.perf_counter() - started,
        )
        self.loaded[key] = pipe
        return pipe

    def _load(self, key: tuple[str, str | None], source: str, quantize: str | None) -> Any:
        from models.pipeline import load_pipeline

        settings = self.settings
        # With an 8-bit T5, or in low-memory mode (the 8 GB recipe), the pipeline holds no text encoder:
        # prompts are encoded beforehand into the prompt cache (RenderCaches.encode_missing_prompts), by a
        # resident 8-bit T5, or in low-memory mode by one loaded for the purpose and freed before rendering.
        with_text_encoder = not self.low_memory and quantize != "int8"
        pipe = load_pipeline(source, device=settings.device, dtype=settings.dtype, with_text_encoder=with_text_encoder)
        if quantize == "int8" and not self.low_memory:
            from models.quantize import load_text_encoder_8bit

            self.encoders[key] = (pipe.tokenizer, load_text_encoder_8bit(source, device=str(pipe.device)))
        if quantize == "int8" and pipe.device.type == "cuda":
            from models.quantize import load_transformer_8bit

            # 8-bit transformer weights need CUDA (bitsandbytes through diffusers refuses the CPU).
            pipe.transformer = load_transformer_8bit(source, device=str(pipe.device))
        return pipe

    def stats(self) -> dict[str, int]:
        return {"entries": len(self.loaded), "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


@dataclass
class RenderCaches:
    """The per-process caches around the pipelines (encode a prompt or condition once, reuse it across seeds)."""

    settings: Settings
    storage: Storage
    pipelines: PipelineCache
    adapters: Any = None
    conditions: Any = None
    prompts: Any = None
    t5_loads: int = 0

    def __post_init__(self) -> None:
        from models.caches import AdapterCache, ConditionLatentCache, PromptEmbeddingCache

        self.adapters = AdapterCache(max_entries=2)
        self.conditions = ConditionLatentCache(max_entries=256)
        self.prompts = PromptEmbeddingCache(max_entries=4096)

    def adapter(self, name: str, pipe: Any) -> Any:
        """The ControlNet adapter `name`, in the pipeline's dtype and device, loaded once."""
        from models.controlnet import load_controlnet

        dtype, device = pipe.transformer.dtype, pipe.device
        source = controlnet_source(name, self.settings)
        return self.adapters.get_or_load(name, dtype, lambda: load_controlnet(source, dtype=dtype, device=device))

    def condition_latents(self, jobs: list[Claimed], pipe: Any) -> list[Any]:
        """One condition latent per job, encoded at the size the pipeline really renders, cached by sha256."""
        from models.pipeline import render_size

        width, height = render_size(pipe, jobs[0].width, jobs[0].height)
        # Keyed by the sha256 recorded at submit: a hit touches neither storage nor the file.
        return [
            self.conditions.latents_for(
                str(job.control_sha256), lambda job=job: self._condition_file(job), pipe.vae, width, height
            )
            for job in jobs
        ]

    def prompt_key(self, job: Claimed) -> str:
        return f"{job.model}|{job.quantize or 'full'}"

    def encode_missing_prompts(self, job: Claimed, prompts: list[str]) -> None:
        """For pipelines without a text encoder: put these prompts' embeddings in the cache first."""
        key = self.prompt_key(job)
        missing = sorted({p for p in prompts if (key, p) not in self.prompts})
        if not missing:
            return
        from models.quantize import encode_prompts, encode_prompts_low_memory

        pipe = self.pipelines.get(job.model, job.quantize)
        resident = self.pipelines.encoders.get((job.model, job.quantize))
        if resident is not None:
            embeds, mask = encode_prompts(resident, missing)
        else:
            embeds, mask = encode_prompts_low_memory(
                model_source(job.model, self.settings), missing, device=str(pipe.device)
            )
            self.t5_loads += 1
        dtype = pipe.transformer.dtype
        for index, prompt in enumerate(missing):
            self.prompts.put((key, prompt), (embeds[index : index + 1].to(dtype), mask[index : index + 1]))

    def stats(self) -> dict[str, Any]:
        return {
            "pipelines": self.pipelines.stats(),
            "prompts": self.prompts.stats(),
            "conditions": self.conditions.stats(),
            "adapters": self.adapters.stats(),
            "t5_loads": self.t5_loads,
        }

    def _condition_file(self, job: Claimed) -> Path:
        """The job's condition image as a local file: fetched from storage once, checked against its sha256."""
        if not job.control_uri or not job.control_sha256:
            raise ValueError(f"job {job.id} has a controlnet but no stored condition")
        # A condition in a local storage folder is used where it lies; one in a bucket is fetched once.
        local = urlsplit(job.control_uri).scheme == "file"
        path = self.settings.home / "cache" / "conditions" / job.control_sha256
        if not local and path.is_file():
            return path
        data = self.storage.read_verified(job.control_uri, job.control_sha256, what=f"the condition of job {job.id}")
        if local:
            return Path(unquote(urlsplit(job.control_uri).path))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
        return path

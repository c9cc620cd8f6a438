"""What a worker keeps loaded between tasks: pipelines, ControlNet adapters, condition latents, prompt embeddings.

Every cache is bounded and counts hits, misses and evictions; the counters are logged after each task and
at shutdown.

Low-memory mode (`farm worker --low-memory`, `low_memory = true` in a pool) follows the paper's 8 GB recipe once
per task (RenderCaches.prepare): every prompt the task needs that is not cached yet is encoded by a T5 loaded
for that alone, at the jobs' T5 precision, while no transformer or VAE is on the device; T5 is freed, and only
then are the transformer and VAE brought (back) onto the device to render.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from farm.job import Claimed
from farm.profiles import PROFILES, controlnet_source, model_source, scorer_sources
from farm.settings import Settings
from farm.storage import Storage

log = logging.getLogger("farm.worker")

# Prompts per T5 call when a task's prompts are encoded together: one load, a bounded activation peak.
ENCODE_CHUNK = 32

# What a job's `quantize` means for its T5 (JobSpec.quantize): both 8-bit options use the 8-bit T5, so they share
# its prompt embeddings; "int8-transformer" also loads the transformer in 8-bit (CUDA only).
_T5_PRECISION: dict[str | None, str | None] = {None: None, "int8": "int8", "int8-transformer": "int8"}

Event = Callable[[str, str], None]


def t5_precision(quantize: str | None) -> str | None:
    """The T5 precision of a job's `quantize`: None (full precision, the worker's dtype) or "int8"."""
    if quantize not in _T5_PRECISION:
        raise ValueError(f"unknown quantize {quantize!r}: expected None, 'int8' or 'int8-transformer'")
    return _T5_PRECISION[quantize]


def _worker_device_and_dtype(settings: Settings) -> tuple[str, Any]:
    """The device and dtype the worker renders with (what load_pipeline resolves the settings to)."""
    from models.devices import resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    return device, resolve_dtype(settings.dtype, device)


@dataclass
class PipelineCache:
    """Loaded pipelines keyed by (model, quantization), least recently used evicted beyond `capacity`."""

    settings: Settings
    capacity: int = 1
    low_memory: bool = False
    loaded: OrderedDict[tuple[str, str | None], Any] = field(default_factory=OrderedDict)
    # 8-bit T5s kept beside their pipelines (not inside: the pipeline would cast embeddings to their fp16).
    encoders: dict[tuple[str, str | None], Any] = field(default_factory=dict)
    # Pipelines moved to the CPU while a T5 had the device (low-memory mode); get() puts them back.
    offloaded: set[tuple[str, str | None]] = field(default_factory=set)
    # (name, detail) of each move: "pipeline_placed", "pipeline_offloaded" (RenderCaches routes it to its on_event).
    on_event: Event | None = None
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def get(self, model: str, quantize: str | None = None) -> Any:
        """The pipeline for a job's model and quantization on the worker's device, loading it on first use (never
        at import) and bringing it back if low-memory mode moved it off the device."""
        key = (model, quantize)
        if key in self.loaded:
            self.hits += 1
            self.loaded.move_to_end(key)
            pipe = self.loaded[key]
            if key in self.offloaded:
                self._place(key, pipe)
            return pipe
        self.misses += 1
        # Evict first: on a GPU the old pipeline must leave before the new one fits.
        if len(self.loaded) >= self.capacity:
            from models.quantize import release_memory

            while len(self.loaded) >= self.capacity:
                evicted, _ = self.loaded.popitem(last=False)
                self.encoders.pop(evicted, None)
                self.offloaded.discard(evicted)
                self.evictions += 1
                log.info("pipeline cache: evicted %s (%s)", evicted, self.stats())
            release_memory()
        source = model_source(model, self.settings)
        started = time.perf_counter()
        pipe = self._load(key, source, quantize)
        log.info(
            "loaded model %s (quantize=%s, low_memory=%s) from %s in %.1f s",
            model,
            quantize,
            self.low_memory,
            "nowhere: renderer null" if self.settings.renderer == "null" else source,
            time.perf_counter() - started,
        )
        self.loaded[key] = pipe
        self._emit("pipeline_placed", str(pipe.device))
        return pipe

    def offload(self, *, drop_8bit: bool = True) -> None:
        """Take every loaded pipeline's transformer and VAE off the accelerator, then hand the memory back (low-memory
        mode, before a T5 loads). 8-bit modules cannot be moved with .to(): such a pipeline is dropped and loaded
        again on its next get() (`drop_8bit=False` leaves it where it is). On a CPU worker there is nothing to move."""
        from models.quantize import release_memory

        moved = False
        for key, pipe in list(self.loaded.items()):
            if key in self.offloaded or pipe.device.type == "cpu":
                continue
            if _has_8bit_transformer(pipe):
                if not drop_8bit:
                    continue
                del self.loaded[key]
                self.encoders.pop(key, None)
                how = "dropped"
            else:
                pipe.to("cpu")
                self.offloaded.add(key)
                how = "cpu"
            moved = True
            self._emit("pipeline_offloaded", f"{key[0]}|{key[1] or 'full'}|{how}")
        if moved:
            del pipe  # the loop's last reference: a dropped pipeline must be garbage before release_memory
            release_memory()

    def _place(self, key: tuple[str, str | None], pipe: Any) -> None:
        device, _dtype = _worker_device_and_dtype(self.settings)
        pipe.to(device)
        self.offloaded.discard(key)
        self._emit("pipeline_placed", str(pipe.device))

    def _emit(self, name: str, detail: str) -> None:
        if self.on_event is not None:
            self.on_event(name, detail)

    def _load(self, key: tuple[str, str | None], source: str, quantize: str | None) -> Any:
        if self.settings.renderer == "null":  # `--renderer null`: a stand-in, nothing loaded (models/null.py)
            from models.null import NullPipeline

            return NullPipeline(key[0], quantize)
        from models.pipeline import load_pipeline

        settings = self.settings
        precision = t5_precision(quantize)
        transformer_8bit = None
        if quantize == "int8-transformer":
            from models.quantize import load_transformer_8bit

            # Before anything else: on a CPU this raises QuantizationUnavailable (bitsandbytes through diffusers
            # needs CUDA), which fails the job's render with that message, having loaded nothing.
            device, _dtype = _worker_device_and_dtype(settings)
            transformer_8bit = load_transformer_8bit(source, device=device)
        # With an 8-bit T5, or in low-memory mode (the 8 GB recipe), the pipeline holds no text encoder:
        # prompts are encoded beforehand into the prompt cache (RenderCaches.prepare), by a resident 8-bit
        # T5, or in low-memory mode by one loaded at the job's precision for the purpose and freed before
        # the transformer and VAE are placed.
        with_text_encoder = not self.low_memory and precision is None
        # A released profile names its sampler (LCM for δ, DPM-Solver++ for α); anything else keeps its own.
        profile = PROFILES.get(key[0])
        sampler = profile.sampler.name if profile is not None and profile.sampler is not None else None
        pipe = load_pipeline(
            source,
            device=settings.device,
            dtype=settings.dtype,
            with_text_encoder=with_text_encoder,
            sampler=sampler,
        )
        if transformer_8bit is not None:
            from models.quantize import release_memory

            # "int8-transformer": the transformer in 8-bit too. ("int8" keeps it at the worker's dtype.)
            pipe.transformer = transformer_8bit
            release_memory()  # the full-precision transformer load_pipeline brought
        if precision == "int8" and not self.low_memory:
            from models.quantize import load_text_encoder

            self.encoders[key] = (pipe.tokenizer, load_text_encoder(source, precision="int8", device=str(pipe.device)))
        self._apply_fast_path(key, pipe)
        if self.low_memory:
            # Decode a batch's latents one image at a time (AutoencoderKL.enable_slicing; diffusers 0.42's
            # PixArtAlphaPipeline has no enable_vae_slicing). Not tiling: tiles blend at their seams, which changes
            # pixels. At 1024 px in fp16: transformer 0.6B ≈ 1.2 GB, VAE 80M ≈ 0.16 GB, and the VAE decode of one
            # 1024 px image peaks at ≈ 4.8 GB, so ≈ 6.2 GB with one image decoded at a time (BENCHMARKS.md, "the 8 GB
            # order"); a batch decoded at once would multiply the decode's share by the batch size.
            pipe.vae.enable_slicing()
        return pipe

    def _apply_fast_path(self, key: tuple[str, str | None], pipe: Any) -> None:
        """The worker's fast path (FARM_FAST_PATH / --fast-path / a pool's fast_path), once per loaded pipeline;
        torch.compile's cache goes to the models volume (Settings.compile_cache_path)."""
        from models.fastpath import apply_fast_path, parse_fast_path

        fast = parse_fast_path(
            self.settings.fast_path,
            device=str(pipe.device),
            low_memory=self.low_memory,
            compile_cache=self.settings.compile_cache_path,
        )
        done = apply_fast_path(pipe, fast)
        log.info("fast path %s for %s (quantize=%s): %s", fast.describe(), key[0], key[1], "; ".join(done))

    def stats(self) -> dict[str, int]:
        return {"entries": len(self.loaded), "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


def _has_8bit_transformer(pipe: Any) -> bool:
    """True when the pipeline's transformer was loaded through bitsandbytes (it cannot be moved with .to())."""
    transformer = getattr(pipe, "transformer", None)
    return bool(getattr(transformer, "is_loaded_in_8bit", False) or getattr(transformer, "hf_quantizer", None))


@dataclass
class RenderCaches:
    """The per-process caches around the pipelines (encode a prompt or condition once, reuse it across seeds)."""

    settings: Settings
    storage: Storage
    pipelines: PipelineCache
    adapters: Any = None
    conditions: Any = None
    prompts: Any = None
    t5_loads: int = 0  # T5s loaded for one task's prompts and freed again (low-memory mode)
    # Called with (name, detail) at each step of the low-memory order, as it happens: "t5_loaded" (model|precision),
    # "t5_released", "pipeline_offloaded", "pipeline_placed" (device). The worker logs them (workers/runtime.py).
    on_event: Event | None = None
    _hed: tuple[str, Any] | None = None  # (weights sha256, HEDNetwork) of the last `--condition hed` job
    # Loaded scorer profiles (models/scoring.py), by name: the two most recently used.
    _scorers: OrderedDict[str, Any] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        from models.caches import AdapterCache, ConditionLatentCache, PromptEmbeddingCache

        self.adapters = AdapterCache(max_entries=2)
        self.conditions = ConditionLatentCache(max_entries=256)
        self.prompts = PromptEmbeddingCache(max_entries=4096)
        # The pipelines' moves are steps of the same order: they reach whoever listens here.
        self.pipelines.on_event = self._emit
        if self.null:
            log.warning("renderer null: no model is loaded; every image is synthetic (models/null.py), for benchmarks")

    @property
    def null(self) -> bool:
        """`farm worker --renderer null`: synthetic images at once, no model (models/null.py); never the default."""
        return self.settings.renderer == "null"

    def renderer(self) -> tuple[Callable[..., list[Any]], Callable[..., dict[str, Any]]]:
        """render_batch and render_recipe of this worker's renderer: the pipeline's, or the null stand-in's."""
        if self.null:
            import models.null

            return models.null.render_batch, models.null.render_recipe
        import models.pipeline
        import models.recipe

        return models.pipeline.render_batch, models.recipe.render_recipe

    def scorers(self, name: str) -> Any:
        """The scorers of profile `name` (or a folder), on the worker's device, loaded once (two kept)."""
        if name in self._scorers:
            self._scorers.move_to_end(name)
            return self._scorers[name]
        from models.scoring import load_scorers

        sources = scorer_sources(name, self.settings)
        if "clip" not in sources:
            raise ValueError(f"scorer {name!r}: no CLIP model (a profile, or a folder holding clip/)")
        device, dtype = _worker_device_and_dtype(self.settings)
        started = time.monotonic()
        loaded = load_scorers(
            sources["clip"], sources.get("aesthetic"), sources.get("safety"), device=device, dtype=dtype
        )
        self._emit("scorer_loaded", f"{name} in {time.monotonic() - started:.1f} s")
        self._scorers[name] = loaded
        while len(self._scorers) > 2:
            self._scorers.popitem(last=False)
        return loaded

    def adapter(self, name: str, pipe: Any) -> Any:
        """The ControlNet adapter `name`, in the pipeline's dtype and device, loaded once."""
        from models.controlnet import load_controlnet

        dtype, device = pipe.transformer.dtype, pipe.device
        source = controlnet_source(name, self.settings)
        adapter = self.adapters.get_or_load(name, dtype, lambda: load_controlnet(source, dtype=dtype, device=device))
        return adapter.to(device)  # back from the CPU if low-memory mode moved it off for a T5 phase

    def _offload_adapters(self) -> None:
        """Low-memory mode, before a T5 loads: ControlNet adapters (≈ 0.6 GB each in fp16) off the device too."""
        for key in self.adapters.cached_keys():
            adapter = self.adapters.get(key)
            if adapter is not None and adapter.device.type != "cpu":
                adapter.to("cpu")
                self._emit("adapter_offloaded", key[0])

    def condition_latents(self, jobs: list[Claimed], pipe: Any) -> list[Any]:
        """One condition latent per job, encoded at the size the pipeline really renders, cached by sha256."""
        from models.pipeline import render_size

        width, height = render_size(pipe, jobs[0].width, jobs[0].height)
        preprocess = jobs[0].control_preprocess  # one render group: the same for the whole batch
        hed = self.hed(preprocess, pipe.device) if preprocess is not None else None
        # Keyed by the sha256 recorded at submit (and the preprocessing): a hit touches neither storage nor the file.
        return [
            self.conditions.latents_for(
                str(job.control_sha256),
                lambda job=job: self._condition_file(job),
                pipe.vae,
                width,
                height,
                hed=hed,
                preprocess=preprocess,
            )
            for job in jobs
        ]

    def hed(self, preprocess: str, device: Any) -> Any:
        """The HED network a job's control_preprocess ("hed:<sha256>") names: this machine's FARM_HED_WEIGHTS file,
        or the hub's ControlNetHED.pth, loaded once and only if its sha256 is the one the job was submitted with."""
        kind, _, sha256 = preprocess.partition(":")
        if kind != "hed" or not sha256:
            raise ValueError(f"unknown condition preprocessing {preprocess!r}")
        if self._hed is not None and self._hed[0] == sha256:
            return self._hed[1]
        from models.hed import HED_HUB_ID, load_hed

        local = self.settings.hed_weights_path
        source = str(local) if local.is_file() else HED_HUB_ID
        net = load_hed(source, device=device, expected_sha256=sha256)
        self._hed = (sha256, net)
        log.info("loaded HED weights %s from %s", sha256[:12], source)
        return net

    def prompt_key(self, job: Claimed) -> str:
        """The prompt cache's model key: the model and its T5 precision ("int8" and "int8-transformer" share T5)."""
        return f"{job.model}|{t5_precision(job.quantize) or 'full'}"

    def prepare(self, jobs: list[Claimed]) -> None:
        """Before a task renders: put every prompt its jobs need (each prompt, and for jobs with guidance_scale > 1
        the negative prompt, "" when none) that is not cached yet into the prompt cache, with one T5 load per
        (model, T5 precision) for the whole task, where the pipeline has no T5 of its own (8-bit T5, low-memory).

        Low-memory mode, in the paper's order: transformer and VAE off the device (pipeline_offloaded), T5 loaded at
        the jobs' precision (t5_loaded), every new prompt encoded, T5 freed (t5_released), and only then the
        pipeline the task renders first loaded or moved onto the device (pipeline_placed).

        Never raises for a failure (a T5 or pipeline that does not load): that is logged, and the per-batch
        encode_missing_prompts or pipelines.get() meets it again inside the render and fails those jobs with it.
        """
        wanted: dict[str, tuple[Claimed, set[str]]] = {}
        order: list[tuple[str, str | None]] = []
        for job in jobs:
            try:
                key = self.prompt_key(job)
            except ValueError:
                continue  # an unknown quantize: the render fails the job with the message
            texts = wanted.setdefault(key, (job, set()))[1]
            texts.add(job.prompt)
            if job.guidance_scale > 1:
                texts.add(job.negative_prompt or "")
            if (job.model, job.quantize) not in order:
                order.append((job.model, job.quantize))
        todo = [(first, self._missing(key, texts)) for key, (first, texts) in wanted.items()]
        todo = [(first, missing) for first, missing in todo if missing and self._needs_encoding(first)]
        if not todo:
            return
        if not self.pipelines.low_memory:
            for first, missing in todo:  # a resident 8-bit T5 beside the pipeline: one encode per group
                self._guarded(self._encode_resident, first, missing)
            return
        try:
            self.pipelines.offload()
            self._offload_adapters()
        except Exception:
            log.exception("could not move the pipelines off the device before encoding; encoding beside them")
        for first, missing in todo:
            self._guarded(self._encode_transient, first, missing)
        # What renders first goes onto the device now; more pipelines than the cache holds would only evict each
        # other here, so the rest load when their batches come.
        for model, quantize in order[: self.pipelines.capacity]:
            self._guarded_place(model, quantize)

    def encode_missing_prompts(self, job: Claimed, prompts: list[str]) -> None:
        """For pipelines without a text encoder: put these prompts' embeddings in the cache first (per batch; after
        prepare() they are all there already, and this does nothing)."""
        missing = self._missing(self.prompt_key(job), prompts)
        if not missing:
            return
        if not self.pipelines.low_memory:
            self._encode_resident(job, missing)
            return
        # The caller holds its pipeline: move it off and back (same object), but an 8-bit one stays where it is.
        self.pipelines.offload(drop_8bit=False)
        self._encode_transient(job, missing)
        self.pipelines.get(job.model, job.quantize)

    def stats(self) -> dict[str, Any]:
        return {
            "pipelines": self.pipelines.stats(),
            "prompts": self.prompts.stats(),
            "conditions": self.conditions.stats(),
            "adapters": self.adapters.stats(),
            "t5_loads": self.t5_loads,
        }

    def _missing(self, key: str, prompts: Iterable[str]) -> list[str]:
        return sorted({p for p in prompts if (key, p) not in self.prompts})

    def _needs_encoding(self, job: Claimed) -> bool:
        """False where the pipeline encodes its own prompts as it renders (a resident full-precision T5)."""
        if self.null:
            return False  # no model, no prompts to encode
        return self.pipelines.low_memory or t5_precision(job.quantize) is not None

    def _encode_resident(self, job: Claimed, missing: list[str]) -> None:
        """Encode with the 8-bit T5 kept beside the job's pipeline (loading both on first use)."""
        self.pipelines.get(job.model, job.quantize)
        encoder = self.pipelines.encoders[(job.model, job.quantize)]
        self._encode_into_cache(self.prompt_key(job), encoder, missing)

    def _encode_transient(self, job: Claimed, missing: list[str]) -> None:
        """Steps 1–2 of the 8 GB recipe at the job's T5 precision: load T5 alone, encode what is missing, free it."""
        from models.quantize import load_text_encoder, load_tokenizer, release_memory

        precision = t5_precision(job.quantize)
        source = model_source(job.model, self.settings)
        device, dtype = _worker_device_and_dtype(self.settings)
        tokenizer = load_tokenizer(source)
        # int8: LLM.int8 linears with their other parts in fp16 (as the resident 8-bit T5); full: the worker's dtype.
        encoder = load_text_encoder(source, precision=precision, device=device, dtype=None if precision else dtype)
        self.t5_loads += 1
        self._emit("t5_loaded", f"{job.model}|{precision or 'full'}")
        try:
            self._encode_into_cache(self.prompt_key(job), (tokenizer, encoder), missing)
        finally:
            del encoder
            release_memory()
            self._emit("t5_released", f"{job.model}|{precision or 'full'}")

    def _encode_into_cache(self, key: str, encoder: tuple[Any, Any], missing: list[str]) -> None:
        from models.quantize import encode_prompts

        _device, dtype = _worker_device_and_dtype(self.settings)
        # Low-memory mode keeps the embeddings in host memory (≈ 1 MB each at 120 × 4096 in fp16: a full cache
        # would be ≈ 4 GB on an 8 GB card); render_batch moves a batch's rows to the device.
        home = "cpu" if self.pipelines.low_memory else None
        for start in range(0, len(missing), ENCODE_CHUNK):
            chunk = missing[start : start + ENCODE_CHUNK]
            embeds, mask = encode_prompts(encoder, chunk)
            for index, prompt in enumerate(chunk):
                # Copies, so that an entry does not keep its whole chunk alive after the others are evicted.
                entry = (
                    embeds[index : index + 1].to(device=home, dtype=dtype, copy=True),
                    mask[index : index + 1].to(device=home, copy=True),
                )
                self.prompts.put((key, prompt), entry)

    def _guarded(self, encode: Callable[[Claimed, list[str]], None], job: Claimed, missing: list[str]) -> None:
        try:
            encode(job, missing)
        except Exception as exc:
            log.warning(
                "could not encode the prompts of model %s (quantize=%s) before rendering: %s: %s; "
                "their batches try again and fail with it",
                job.model,
                job.quantize,
                type(exc).__name__,
                exc,
            )

    def _guarded_place(self, model: str, quantize: str | None) -> None:
        try:
            self.pipelines.get(model, quantize)
        except Exception as exc:
            log.warning(
                "could not load model %s (quantize=%s): %s: %s; its batches try again and fail with it",
                model,
                quantize,
                type(exc).__name__,
                exc,
            )

    def _emit(self, name: str, detail: str) -> None:
        if self.on_event is not None:
            self.on_event(name, detail)

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

"""farm.Client: submit prompts, follow a dataset and read its finished images from Python (notebooks).

A thin layer over the functions `farm submit`, `farm status` and `farm dispatch` call, so it validates
exactly as the CLI does (InvalidSubmission, naming the file and line, or `<prompts>:row N` for a list).
"""

from __future__ import annotations

import builtins
import io
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Engine

from farm.errors import InvalidSubmission, StorageError
from farm.job import INPUT_FIELDS, JobSpec
from farm.settings import Settings, load_settings
from farm.storage import Storage, storage_for
from farm.store.queries import DatasetStatus, dataset_id, dataset_status
from farm.store.schema import Job, JobStatus
from farm.submit.inputs import FORMATS, rows_from_records
from farm.submit.plan import SubmitOptions, plan_rows, plan_submission
from farm.submit.run import SubmitResult, submit_plan

if TYPE_CHECKING:
    from PIL import Image

    from farm.dispatch.publish import Dispatched

__all__ = ["Client", "FinishedImage", "SubmitResult"]

_PAGE = 500
# submit(**options): SubmitOptions' fields, and `steps` as the CLI spells num_inference_steps.
# The limits come from the settings, the folders from control_dir: neither is a per-call option.
_OPTION_NAMES = tuple(
    f.name
    for f in fields(SubmitOptions)
    if f.name not in ("dataset", "vary", "control_dirs", "control_image_max_bytes", "max_line_bytes")
)

Prompts = Sequence[str] | Sequence[Mapping[str, Any]] | str | os.PathLike[str]
Vary = Sequence[str] | Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class FinishedImage(JobSpec):
    """One job of a dataset: its inputs (farm/job.py's JobSpec) and, once it succeeded, its stored image."""

    job_id: str
    dataset: str
    state: str
    uri: str | None
    sha256: str | None
    bytes: int | None
    _storage: Storage = field(repr=False, compare=False)

    def read_bytes(self) -> builtins.bytes:
        """The PNG as stored, checked against the SHA-256 recorded when it was rendered."""
        if self.uri is None:
            raise StorageError(f"job {self.job_id} has no image (it is {self.state})")
        return self._storage.read_verified(self.uri, self.sha256, what=f"the image of job {self.job_id}")

    def open(self) -> Image.Image:
        """The image as a PIL image, fully decoded."""
        from PIL import Image

        image = Image.open(io.BytesIO(self.read_bytes()))
        image.load()
        return image


class Client:
    """The farm from Python: `Client().submit(["a red fox"], "foxes")`, `.wait("foxes")`, `.images("foxes")`."""

    def __init__(self, settings: Settings | None = None, *, home: str | os.PathLike[str] | None = None) -> None:
        if settings is not None and home is not None:
            raise TypeError("give settings or home, not both (home is one of the settings)")
        self.settings = settings if settings is not None else load_settings(home=None if home is None else str(home))
        self._engine: Engine | None = None
        self._storage: Storage | None = None

    @property
    def engine(self) -> Engine:
        """The job database, opened (and for the embedded default, created) on first use."""
        if self._engine is None:
            from farm.store.engine import open_store

            self._engine = open_store(self.settings)
        return self._engine

    @property
    def storage(self) -> Storage:
        """The storage the images are in, opened on first use."""
        if self._storage is None:
            self._storage = storage_for(self.settings)
        return self._storage

    def submit(
        self,
        prompts: Prompts,
        dataset: str,
        *,
        vary: Vary | None = None,
        dispatch: bool = False,
        dry_run: bool = False,
        control_dir: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> SubmitResult:
        """Validate every prompt, then record the jobs, as `farm submit` does: running workers send them to the
        broker within a second (dispatch=True also publishes a window now, as `farm submit --dispatch`).

        prompts: a path to a .txt/.jsonl/.csv/.parquet file, or a list of prompt strings or of dicts with the
        fields a .jsonl line may have. options: model, width, height, steps (num_inference_steps),
        guidance_scale, images_per_prompt, seed, control_image, controlnet, conditioning_scale, quantize, and the
        acceptance rules accept, max_tries, min_clip_score, min_aesthetic, safety, dedup, keep_rejected, scorer.
        vary: ["seed=0..7", "size=1024x1024,768x1344"] or {"seed": range(8), "size": [(1024, 1024)]}.
        A bad value raises InvalidSubmission and writes nothing; dry_run=True only plans (result.plan).
        control_dir: the folder control_image paths in the rows (or in the file, besides its own folder) may name.
        """
        submit_options = self._options(dataset, vary, options, control_dir)
        if isinstance(prompts, str | os.PathLike):
            path = Path(prompts)
            if path.suffix.lower() not in FORMATS:
                raise InvalidSubmission(
                    f"a path to a {', '.join(FORMATS)} file, or a list of prompts, is needed; "
                    "for one prompt pass [prompt]",
                    path=str(prompts),
                )
            plan = plan_submission(path, submit_options)
        else:
            # Paths in the dicts are as untrusted as those in a file: they resolve inside control_dir only.
            base = Path(control_dir) if control_dir is not None else None
            plan = plan_rows(rows_from_records(prompts), submit_options, base_dir=base)
        engine = None if dry_run else self.engine
        return submit_plan(self.settings, plan, dispatch=dispatch, dry_run=dry_run, engine=engine)

    def dispatch(self, dataset: str | None = None) -> Dispatched:
        """Publish a window of pending jobs now, as `farm dispatch` (workers' dispatcher does it on its own)."""
        from farm.submit.run import dispatch_dataset

        ds_id = dataset_id(self.engine, dataset) if dataset is not None else None
        return dispatch_dataset(self.settings, self.engine, ds_id)

    def status(self, dataset: str) -> DatasetStatus:
        """Counts per state, images/s and ETA; UnknownDataset for a name never submitted."""
        return dataset_status(self.engine, dataset)

    def wait(self, dataset: str, timeout_s: float | None = None, poll_s: float = 1.0) -> DatasetStatus:
        """Poll until every job has finished (succeeded, failed or canceled); TimeoutError after timeout_s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status(dataset)
            if status.done:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"dataset {dataset!r} not finished after {timeout_s} s: {status.finished}/{status.total} "
                    f"finished, counts {status.counts}"
                )
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))

    def images(self, dataset: str, *, state: str | None = "succeeded") -> Iterator[FinishedImage]:
        """A dataset's jobs in one state (all with state=None), in file order, read page by page."""
        if state is not None and state not in {s.value for s in JobStatus}:
            raise ValueError(f"state must be one of {', '.join(s.value for s in JobStatus)} or None, got {state!r}")
        ds_id = dataset_id(self.engine, dataset)
        line = func.coalesce(Job.source_line, 0)
        inputs = [Job.__table__.c[name] for name in INPUT_FIELDS]
        columns = (Job.id, Job.status, Job.output_uri, Job.sha256, Job.bytes, *inputs)
        after: tuple[int, str] | None = None
        while True:
            query = select(*columns).where(Job.dataset_id == ds_id).order_by(line, Job.id).limit(_PAGE)
            if state is not None:
                query = query.where(Job.status == state)
            if after is not None:
                query = query.where(or_(line > after[0], and_(line == after[0], Job.id > after[1])))
            with self.engine.connect() as conn:
                page = conn.execute(query).all()
            for row in page:
                yield FinishedImage(
                    **{name: getattr(row, name) for name in INPUT_FIELDS},
                    job_id=row.id,
                    dataset=dataset,
                    state=row.status,
                    uri=row.output_uri,
                    sha256=row.sha256,
                    bytes=row.bytes,
                    _storage=self.storage,
                )
            if len(page) < _PAGE:
                return
            after = (page[-1].source_line or 0, page[-1].id)

    def close(self) -> None:
        """Release the database connections."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _options(
        self, dataset: str, vary: Vary | None, options: dict[str, Any], control_dir: str | os.PathLike[str] | None
    ) -> SubmitOptions:
        if "steps" in options:
            if "num_inference_steps" in options:
                raise TypeError("give steps or num_inference_steps, not both")
            options["num_inference_steps"] = options.pop("steps")
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"unknown submit option(s) {', '.join(unknown)}; options: steps, {', '.join(_OPTION_NAMES)}"
            )
        if options.get("control_image") is not None:
            options["control_image"] = Path(options["control_image"])
        if options.get("quantize") == "none":
            options["quantize"] = None
        from farm.submit.run import choose_model

        options["model"] = choose_model(
            self.settings, dataset, options.get("model"), controlnet=options.get("controlnet"), engine=self._engine
        )
        options.setdefault("hed_weights", self.settings.hed_weights_path)
        options.setdefault("scorer", self.settings.default_scorer)
        return SubmitOptions(
            dataset=dataset,
            vary=_vary_texts(vary),
            control_dirs=(Path(control_dir),) if control_dir is not None else (),
            control_image_max_bytes=self.settings.control_image_max_bytes,
            max_line_bytes=self.settings.max_line_bytes,
            **options,
        )


def _vary_texts(vary: Vary | None) -> tuple[str, ...]:
    """--vary option texts from a list of them or from {axis: values}."""
    if vary is None:
        return ()
    if isinstance(vary, str):
        return (vary,)
    if not isinstance(vary, Mapping):
        return tuple(str(text) for text in vary)
    texts = []
    for axis, values in vary.items():
        if isinstance(values, str):
            spec = values
        elif isinstance(values, range) and values.step == 1 and len(values) > 0:
            spec = f"{values.start}..{values.stop - 1}"
        elif isinstance(values, Iterable):
            spec = ",".join(_vary_item(value) for value in values)
        else:
            spec = _vary_item(values)
        texts.append(f"{axis}={spec}")
    return tuple(texts)


def _vary_item(value: Any) -> str:
    if isinstance(value, tuple | list) and len(value) == 2:
        return f"{value[0]}x{value[1]}"  # a size
    return str(value)

"""The job is defined once (farm/job.py): every place that handles its fields agrees with that definition.

Staging columns, the claimed-job record, dispatch's grouping key, the export columns and their parquet types and
the Client's FinishedImage are each compared with the definition and with the jobs table; a round trip through a
real SQLite store (record → claim → succeed → export) checks that every input survives each step unchanged.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pyarrow.parquet as pq
from sqlalchemy import BigInteger, Boolean, Float, Integer, select
from sqlalchemy.engine import Engine

from farm.client import FinishedImage
from farm.dispatch.publish import _pending_page, group_jobs
from farm.job import (
    CLAIMED_FIELDS,
    EXPORT_FIELDS,
    EXPORTED_INPUTS,
    INPUT_FIELDS,
    RENDER_GROUP_FIELDS,
    Claimed,
    JobSpec,
)
from farm.outputs.export import FIELDS, export_dataset
from farm.storage import object_key
from farm.storage.local import LocalStorage
from farm.store import transitions
from farm.store.schema import Job
from farm.submit.plan import Plan
from farm.submit.record import STAGED_COLUMNS, record

JOBS = Job.__table__.c
CONTROLLED = JobSpec(
    "a castle",
    42,
    256,
    128,
    2,
    1.5,
    "tiny",
    3,
    controlnet="tiny-controlnet",
    conditioning_scale=0.5,
    control_sha256="0" * 64,
    control_uri="file:///conditions/x.png",
    quantize="int8",
)
PLAIN = JobSpec("a ship", 7, 128, 128, 4, 0.0, "tiny", 4)


def _plan(*specs: JobSpec) -> Plan:
    return Plan("d", list(specs), 0, [spec.id_in("d") for spec in specs])


def test_every_input_is_a_jobs_column_with_matching_nullability() -> None:
    hints = typing.get_type_hints(JobSpec)
    for name in INPUT_FIELDS:
        optional = type(None) in typing.get_args(hints[name])
        assert JOBS[name].nullable == optional, name


def test_staged_claimed_and_exported_columns_derive_from_the_definition() -> None:
    assert ("id", "dataset_id", *INPUT_FIELDS, "status", "attempts", "created_at") == STAGED_COLUMNS
    assert set(CLAIMED_FIELDS) == {*INPUT_FIELDS, "id", "dataset_id", "attempts", "claim_seq"}
    assert all(name in JOBS for name in (*STAGED_COLUMNS, *CLAIMED_FIELDS, *RENDER_GROUP_FIELDS))
    assert tuple(f.name for f in EXPORT_FIELDS) == FIELDS
    assert all(f.source in JOBS for f in EXPORT_FIELDS)
    assert [f.name for f in EXPORT_FIELDS if f.name in INPUT_FIELDS] == list(EXPORTED_INPUTS)
    assert set(RENDER_GROUP_FIELDS) <= set(INPUT_FIELDS) - {"prompt", "seed"}


def test_finished_image_and_claimed_carry_the_job_definition() -> None:
    assert issubclass(FinishedImage, JobSpec) and issubclass(Claimed, JobSpec)
    image_fields = {f.name for f in dataclasses.fields(FinishedImage)}
    assert set(INPUT_FIELDS) <= image_fields


def test_a_job_keeps_every_input_through_record_claim_dispatch_and_export(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    engine = sqlite_engine
    plan = _plan(CONTROLLED, PLAIN)
    record(engine, plan)

    # Dispatch groups pending rows by exactly JobSpec.render_group.
    with engine.connect() as conn:
        groups = dict((key, ids) for key, ids in group_jobs(_pending_page(conn, None, "", 0), batch_size=8))
    assert groups == {spec.render_group: [job_id] for spec, job_id in zip(plan.specs, plan.ids, strict=True)}

    with engine.begin() as conn:
        claimed = transitions.claim(conn, plan.ids, worker="w", lease_s=60, max_attempts=3)
    assert [type(c) for c in claimed] == [Claimed, Claimed]
    for job, spec, job_id in zip(claimed, plan.specs, plan.ids, strict=True):
        assert (job.id, job.attempts) == (job_id, 1)
        assert {name: getattr(job, name) for name in INPUT_FIELDS} == dataclasses.asdict(spec)
        assert job.render_group == spec.render_group

    storage = LocalStorage(tmp_path / "images")
    with engine.begin() as conn:
        for job in claimed:
            stored = storage.put(object_key("", "d", job.id, 1), b"png bytes of " + job.id.encode())
            assert transitions.mark_succeeded(
                conn, job.id, worker="w", seq=job.claim_seq, stored=stored, render_ms=1500
            )

    # settle_s=0: these jobs finished a moment ago; the default margin would hold them for the next export.
    export_dataset(engine, storage, "d", fmt="parquet", to=str(tmp_path / "out"), settle_s=0)
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table.column_names == list(FIELDS)
    for field in EXPORT_FIELDS:  # integer and float columns keep their width from the jobs table
        column_type = JOBS[field.source].type
        arrow = str(table.schema.field(field.name).type)
        if field.name == "render_seconds":
            assert arrow == "double"
        elif isinstance(column_type, BigInteger):
            assert arrow == "int64", field.name
        elif isinstance(column_type, Integer):
            assert arrow == "int32", field.name
        elif isinstance(column_type, Float):
            assert arrow == "double", field.name
        elif isinstance(column_type, Boolean):
            assert arrow == "bool", field.name
        else:
            assert arrow == "string", field.name
    rows = {row["job_id"]: row for row in table.to_pylist()}
    for spec, job_id in zip(plan.specs, plan.ids, strict=True):
        assert {name: rows[job_id][name] for name in EXPORTED_INPUTS} == {
            name: getattr(spec, name) for name in EXPORTED_INPUTS
        }
        assert rows[job_id]["render_seconds"] == 1.5
    with engine.connect() as conn:
        lines = dict(conn.execute(select(Job.id, Job.source_line)).all())
    assert lines == {job_id: spec.source_line for spec, job_id in zip(plan.specs, plan.ids, strict=True)}

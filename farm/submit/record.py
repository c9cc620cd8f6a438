"""Recording a plan: the dataset and every job as pending, in one transaction, existing ids skipped."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from sqlalchemy import Column, MetaData, Table, func, insert, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from farm.errors import InvalidSubmission
from farm.job import INPUT_FIELDS
from farm.rules import Rules
from farm.store.schema import AcceptanceLine, Dataset, Job, JobStatus, utcnow
from farm.submit.plan import Plan, collector_paused

_INSERT_CHUNK = 5_000


@dataclass(frozen=True)
class Recorded:
    """What a submission wrote."""

    dataset_id: int
    dataset: str
    new_jobs: int
    already_present: int


def record(engine: Engine, plan: Plan) -> Recorded:
    """One transaction: the dataset (created if new) and every job as pending; existing ids are skipped.

    Rows are staged in a temporary table (COPY on PostgreSQL) and moved with one INSERT … SELECT … ON
    CONFLICT DO NOTHING, whose row count is exactly the number of new jobs, even with concurrent submits. The jobs'
    insert trigger adds exactly the rows inserted to the dataset's pending count (job_counts), in this transaction.
    """
    unstored = next((s for s in plan.specs if s.control_sha256 is not None and s.control_uri is None), None)
    if unstored is not None:
        raise ValueError(
            f"line {unstored.source_line}: condition {unstored.control_sha256} is not stored; "
            "call store_conditions(plan, storage) before record"
        )
    now = utcnow()
    with engine.begin() as conn:
        dataset_id = _dataset_id(conn, plan.dataset)
        staging = _staging_table()
        # A refused submit rolls back its own DROP (SQLite), leaving the table on this pooled connection.
        staging.drop(conn, checkfirst=True)
        staging.create(conn)
        try:
            # Tuples in STAGED_COLUMNS' order (a JobSpec holds only plain values: dataclasses.asdict's deep copy
            # was two thirds of a 100k-job submit).
            inputs = attrgetter(*INPUT_FIELDS)
            pending = JobStatus.PENDING.value
            rows = (
                (job_id, dataset_id, *inputs(spec), pending, 0, now)
                for spec, job_id in zip(plan.specs, plan.ids, strict=True)
            )
            with collector_paused():
                _stage(conn, staging, rows)
            columns = [c.name for c in staging.columns]
            moved = select(*staging.columns).where(true())  # `WHERE true` lets SQLite parse ON CONFLICT
            # rowcount of an INSERT is only kept when asked for (SQLAlchemy 2: preserve_rowcount).
            stmt = _insert_ignoring_conflicts(conn).from_select(columns, moved)
            added = conn.execute(stmt.execution_options(preserve_rowcount=True)).rowcount
            # A line keeps the rules of its first submit: another submit of its jobs must name the same ones
            # (only jobs that were there already can clash: nothing to look at when every row was new).
            if added < len(plan.specs):
                _check_same_lines(conn, staging)
        finally:
            staging.drop(conn)
        if plan.lines:
            _record_lines(conn, dataset_id, plan)
    return Recorded(dataset_id, plan.dataset, added, len(plan.specs) - added)


def _check_same_lines(conn: Connection, staging: Table) -> None:
    """Refuse (rolling everything back) a job already recorded with another line, or with rules / without them."""
    clash = conn.execute(
        select(staging.c.source_file, staging.c.source_line, staging.c.line_id, Job.line_id)
        .join(Job, Job.id == staging.c.id)
        .where(func.coalesce(Job.line_id, "") != func.coalesce(staging.c.line_id, ""))
        .limit(1)
    ).first()
    if clash is None:
        return
    source_file, source_line, new, old = clash
    had = "with acceptance rules" if old is not None else "without acceptance rules"
    raise InvalidSubmission(
        f"this image was first submitted {had}; a line keeps the rules of its first submit "
        "(submit it to another dataset, or with the same rules)",
        path=source_file,
        line=source_line,
        field="accept",
        value=None if new is None else "rules",
    )


def _record_lines(conn: Connection, dataset_id: int, plan: Plan) -> None:
    """Each new line with its rules; a line already there must have been submitted with the same rules."""
    ids = [line.line_id for line in plan.lines]
    stored: dict[str, str] = {}
    for start in range(0, len(ids), _INSERT_CHUNK):
        chunk = ids[start : start + _INSERT_CHUNK]
        stored.update(
            conn.execute(
                select(AcceptanceLine.line_id, AcceptanceLine.rules).where(AcceptanceLine.line_id.in_(chunk))
            ).all()
        )
    new = []
    for line in plan.lines:
        before = stored.get(line.line_id)
        if before is None:
            new.append(line)
            continue
        differences = Rules.from_json(before).differences(line.rules)
        if differences:
            path, _, number = line.source.rpartition(":")
            raise InvalidSubmission(
                f"the line was first submitted with other acceptance rules ({'; '.join(differences)})",
                path=path,
                line=int(number) if number.isdigit() else None,
                field=differences[0].split(":")[0].replace("-", "_"),
                value=None,
            )
    rows = [
        {
            "line_id": line.line_id,
            "dataset_id": dataset_id,
            "rules": line.rules.to_json(),
            "base_seed": line.base_seed,
            "occurrence": line.occurrence,
            "accept": line.rules.accept,
            "max_tries": line.rules.max_tries,
            "tries": line.rules.accept,
            "decided": 0,
            "accepted": 0,
        }
        for line in new
    ]
    for start in range(0, len(rows), _INSERT_CHUNK):
        conn.execute(_insert_ignoring_conflicts(conn, AcceptanceLine), rows[start : start + _INSERT_CHUNK])
    if new:
        target = sum(line.rules.accept for line in new)
        conn.execute(
            update(Dataset).where(Dataset.id == dataset_id).values(accept_target=Dataset.accept_target + target)
        )


# The job's inputs, as farm/job.py defines them, between its keys and its starting state.
STAGED_COLUMNS = ("id", "dataset_id", *INPUT_FIELDS, "status", "attempts", "created_at")


def _staging_table() -> Table:
    source = Job.__table__.c
    columns = [Column(name, source[name].type, primary_key=name == "id") for name in STAGED_COLUMNS]
    return Table("incoming_jobs", MetaData(), *columns, prefixes=["TEMPORARY"])


def _stage(conn: Connection, staging: Table, rows: Iterator[tuple[Any, ...]]) -> None:
    """Write rows (tuples in STAGED_COLUMNS' order) into the staging table."""
    if conn.dialect.name == "postgresql":
        # COPY is several times faster than multi-row INSERTs for 100k rows.
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY incoming_jobs ({', '.join(STAGED_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    # The driver's executemany, each value converted as SQLAlchemy would bind it (datetimes to SQLite's text).
    processors = [column.type.bind_processor(conn.dialect) for column in staging.columns]
    convert = [(i, p) for i, p in enumerate(processors) if p is not None]
    sql = f"INSERT INTO incoming_jobs ({', '.join(STAGED_COLUMNS)}) VALUES ({', '.join('?' * len(STAGED_COLUMNS))})"
    batch: list[tuple[Any, ...]] = []
    for row in rows:
        if convert:
            values = list(row)
            for i, process in convert:
                values[i] = process(values[i])
            row = tuple(values)
        batch.append(row)
        if len(batch) == _INSERT_CHUNK:
            conn.exec_driver_sql(sql, batch)
            batch = []
    if batch:
        conn.exec_driver_sql(sql, batch)


def _dataset_id(conn: Connection, name: str) -> int:
    found = conn.execute(select(Dataset.id).where(Dataset.name == name)).scalar()
    if found is not None:
        return int(found)
    conn.execute(_insert_ignoring_conflicts(conn, Dataset), {"name": name, "created_at": utcnow()})
    return int(conn.execute(select(Dataset.id).where(Dataset.name == name)).scalar_one())


def _insert_ignoring_conflicts(conn: Connection, table: type[Any] = Job) -> Any:
    dialect = conn.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    return insert(table)

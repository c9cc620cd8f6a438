"""Yield-targeted lines: a try's scores recorded with its result, verdicts decided in try order, follow-up tries.

A line wants `accept` accepted images in at most `max_tries` tries (farm/submit/rules.py). Its tries 0 .. N-1 are
recorded at submit; every try that is not accepted (rejected, duplicate, unscored, or failed for good) adds the
next try, until N are accepted or the tries are spent. Try k's seed comes from the line's base seed, prompt,
occurrence and k (farm.job.derive_seed), so the tries are the same jobs whoever renders them.

The verdicts are decided along the line, in try order, by whichever transaction records a result: it takes the
line's row lock (acceptance_lines), decides every try from the first undecided one while their results are in,
and inserts the follow-up tries (ON CONFLICT DO NOTHING) in that same fenced transaction. A try's verdict so
depends only on its own scores and on the tries before it (the duplicate checks compare it with the accepted
earlier tries), never on which worker finished first. Lines are locked in id order, so two transactions never
wait for each other's lines in opposite orders.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from farm.job import INPUT_FIELDS, JobSpec, Scores, derive_seed
from farm.rules import Rules
from farm.store.schema import AcceptanceLine, Dataset, Job, JobEmbedding, JobStatus, Verdict, utcnow

# The columns a try's judgement reads.
_JUDGED = (
    Job.id,
    Job.try_index,
    Job.status,
    Job.output_uri,
    Job.pixel_sha256,
    Job.scored_by,
    Job.clip_score,
    Job.aesthetic_score,
    Job.nsfw,
)


def score_values(scores: Scores | None) -> dict[str, Any]:
    """The jobs-table values of a try's scores (written by the attempt that won, with its result)."""
    if scores is None:
        return {}
    return {
        "pixel_sha256": scores.pixel_sha256,
        "clip_score": scores.clip_score,
        "aesthetic_score": scores.aesthetic_score,
        "nsfw": scores.nsfw,
        "scored_by": scores.models,
    }


def store_embedding(conn: Connection, job_id: str, dataset_id: int, scores: Scores) -> None:
    """Keep the image's CLIP embedding (float16) in job_embeddings."""
    if scores.embedding is None:
        return
    model = json.loads(scores.models or "{}").get("clip", "")
    values = {
        "job_id": job_id,
        "dataset_id": dataset_id,
        "model": model,
        "dim": len(scores.embedding) // 2,
        "vector": scores.embedding,
    }
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(JobEmbedding).values(**values)
    conn.execute(stmt.on_conflict_do_update(index_elements=[JobEmbedding.job_id], set_=values))


@dataclass
class _Accepted:
    try_index: int
    pixel_sha256: str | None
    vector: tuple[float, ...] | None


@dataclass(frozen=True)
class Decided:
    """What deciding a set of lines did: verdicts written, tries added, rejected images to delete now."""

    verdicts: int = 0
    added: int = 0
    delete_uris: tuple[str, ...] = ()


def decide(conn: Connection, line_ids: Iterable[str | None]) -> Decided:
    """Decide, in try order, every try of these lines whose result is in; add the follow-up tries.

    Call in the transaction that recorded the results. Returns the URIs of rejected images to delete once it
    commits (lines with keep_rejected false: their rows no longer name them, so `farm gc` removes any left).
    """
    verdicts = added = 0
    deletes: list[str] = []
    for line_id in sorted({line for line in line_ids if line is not None}):
        done = _decide_line(conn, line_id)
        verdicts += done.verdicts
        added += done.added
        deletes += done.delete_uris
    return Decided(verdicts, added, tuple(deletes))


def _decide_line(conn: Connection, line_id: str) -> Decided:
    line = conn.execute(
        select(*AcceptanceLine.__table__.c).where(AcceptanceLine.line_id == line_id).with_for_update()
    ).first()
    if line is None:
        return Decided()
    rules = Rules.from_json(line.rules)
    decided, accepted, tries = line.decided, line.accepted, line.tries
    accepted_tries: list[_Accepted] | None = None
    verdicts = added = 0
    deletes: list[str] = []
    # A try that finished after its place was passed (failed for good, then `farm retry`): judged alone, below.
    late = conn.execute(
        select(*_JUDGED).where(
            Job.line_id == line_id,
            Job.try_index < decided,
            Job.status == JobStatus.SUCCEEDED.value,
            Job.verdict.is_(None),
        )
    ).all()
    order = list(late)
    while decided < tries or order:
        in_order = not order
        job = (
            order.pop(0)
            if order
            else conn.execute(select(*_JUDGED).where(Job.line_id == line_id, Job.try_index == decided)).first()
        )
        if job is None:
            break
        if job.status == JobStatus.SUCCEEDED.value:
            if accepted_tries is None:
                accepted_tries = _accepted_tries(conn, line_id)
            verdict, reason = _judge(conn, rules, job, accepted_tries)
            if verdict is Verdict.ACCEPTED and accepted >= rules.accept:
                verdict, reason = Verdict.REJECTED, f"its line already has its {rules.accept} accepted images"
            values: dict[str, Any] = {"verdict": verdict.value, "verdict_reason": reason}
            if verdict is Verdict.ACCEPTED:
                accepted += 1
                accepted_tries.append(_Accepted(job.try_index, job.pixel_sha256, _vector(conn, job.id)))
            elif not rules.keep_rejected and job.output_uri is not None:
                values["output_uri"] = None
                values["verdict_reason"] = f"{reason}; image deleted (keep-rejected no)"
                deletes.append(job.output_uri)
            conn.execute(update(Job).where(Job.id == job.id).values(**values))
            verdicts += 1
            spent = verdict is not Verdict.ACCEPTED
        elif job.status == JobStatus.FAILED.value:
            spent = True  # a seed that cannot be rendered: the line tries the next one
        elif job.status == JobStatus.CANCELED.value:
            spent = False
        else:
            break  # not finished yet: the tries after it wait for its verdict
        if in_order:
            decided += 1
            if spent and accepted < rules.accept and tries < rules.max_tries:
                added += _add_try(conn, line, tries)
                tries += 1
    conn.execute(
        update(AcceptanceLine)
        .where(AcceptanceLine.line_id == line_id)
        .values(decided=decided, accepted=accepted, tries=tries)
    )
    return Decided(verdicts, added, tuple(deletes))


def _judge(conn: Connection, rules: Rules, job: Any, accepted: list[_Accepted]) -> tuple[Verdict, str | None]:
    """One try's verdict from its scores and the tries of its line accepted before it."""
    scores = job
    if rules.needs_scores and job.scored_by is None:
        return Verdict.UNSCORED, "not scored: the worker that rendered it had no scorer"
    if rules.safety == "drop" and scores.nsfw:
        return Verdict.REJECTED, "flagged by the safety checker"
    if rules.min_clip_score is not None and (scores.clip_score or 0.0) < rules.min_clip_score:
        return Verdict.REJECTED, f"clip score {scores.clip_score:.2f} < {rules.min_clip_score:g}"
    if rules.min_aesthetic is not None and (scores.aesthetic_score or 0.0) < rules.min_aesthetic:
        return Verdict.REJECTED, f"aesthetic score {scores.aesthetic_score:.2f} < {rules.min_aesthetic:g}"
    for earlier in accepted:
        if job.pixel_sha256 is not None and earlier.pixel_sha256 == job.pixel_sha256:
            return Verdict.DUPLICATE, f"the same pixels as try {earlier.try_index}"
    if rules.dedup is not None:
        vector = _vector(conn, job.id)
        if vector is not None:
            for earlier in accepted:
                if earlier.vector is None:
                    continue
                similarity = cosine(vector, earlier.vector)
                if similarity >= rules.dedup:
                    return (
                        Verdict.DUPLICATE,
                        f"cosine {similarity:.4f} >= {rules.dedup:g} with try {earlier.try_index}",
                    )
    return Verdict.ACCEPTED, None


def _accepted_tries(conn: Connection, line_id: str) -> list[_Accepted]:
    rows = conn.execute(
        select(Job.id, Job.try_index, Job.pixel_sha256)
        .where(Job.line_id == line_id, Job.verdict == Verdict.ACCEPTED.value)
        .order_by(Job.try_index)
    ).all()
    return [_Accepted(row.try_index, row.pixel_sha256, _vector(conn, row.id)) for row in rows]


def _vector(conn: Connection, job_id: str) -> tuple[float, ...] | None:
    data = conn.execute(select(JobEmbedding.vector).where(JobEmbedding.job_id == job_id)).scalar()
    return decode_embedding(data) if data is not None else None


def decode_embedding(data: bytes) -> tuple[float, ...]:
    """A stored embedding (float16 little-endian) as floats."""
    return struct.unpack(f"<{len(data) // 2}e", data)


def cosine(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Cosine similarity of two embeddings (stored unit-norm; normalised again against float16 rounding)."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _add_try(conn: Connection, line: Any, index: int) -> int:
    """Insert try `index` of the line: its try 0's inputs with the derived seed. Returns 1 if it was new."""
    first = conn.execute(
        select(Dataset.name, *(getattr(Job, name) for name in INPUT_FIELDS))
        .join(Dataset, Dataset.id == Job.dataset_id)
        .where(Job.id == line.line_id)
    ).first()
    if first is None:
        return 0
    inputs = {name: getattr(first, name) for name in INPUT_FIELDS}
    inputs.update(seed=derive_seed(line.base_seed, inputs["prompt"], line.occurrence, index), try_index=index)
    spec = JobSpec(**{f.name: inputs[f.name] for f in fields(JobSpec)})
    row = {
        **inputs,
        "id": spec.id_in(first.name),
        "dataset_id": line.dataset_id,
        "status": JobStatus.PENDING.value,
        "attempts": 0,
        "created_at": utcnow(),
    }
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    result = conn.execute(dialect.insert(Job).values(**row).on_conflict_do_nothing())
    return int(result.rowcount or 0)

"""Recording on PostgreSQL: COPY staging, exact new-job counts, nothing twice."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from farm.store.engine import make_engine
from farm.store.schema import Dataset, Job
from farm.submit.plan import SubmitOptions, plan_submission
from farm.submit.record import record

pytestmark = pytest.mark.integration


def test_record_on_postgres_counts_new_jobs_exactly_and_never_duplicates(tmp_path: Path, pg_url: str) -> None:
    engine = make_engine(pg_url)
    dataset = f"pg-{uuid.uuid4().hex[:8]}"
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i} with 'quotes', tabs\tand \\ backslashes\n" for i in range(3000)))
    options = SubmitOptions(dataset=dataset, images_per_prompt=2)
    first = record(engine, plan_submission(prompts, options))
    again = record(engine, plan_submission(prompts, options))
    prompts.write_text(prompts.read_text() + "one more\n")
    grown = record(engine, plan_submission(prompts, options))
    assert (first.new_jobs, first.already_present) == (6000, 0)
    assert (again.new_jobs, again.already_present) == (0, 6000)
    assert (grown.new_jobs, grown.already_present) == (2, 6000)
    with engine.connect() as conn:
        rows = conn.execute(
            select(func.count(), func.count(func.distinct(Job.seed)))
            .select_from(Job)
            .join(Dataset)
            .where(Dataset.name == dataset)
        ).one()
        sample = conn.execute(
            select(Job.prompt, Job.created_at).join(Dataset).where(Dataset.name == dataset, Job.source_line == 1)
        ).first()
    assert tuple(rows) == (6002, 6002)
    assert sample.prompt == "prompt 0 with 'quotes', tabs\tand \\ backslashes"  # COPY escapes survive
    assert sample.created_at.tzinfo is not None

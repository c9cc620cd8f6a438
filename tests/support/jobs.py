"""Pending jobs written straight into a job store, for tests of what happens to them after submit."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.engine import Engine

from farm.store.schema import Dataset, Job, utcnow


def insert_jobs(engine: Engine, n: int, *, dataset: str | None = None) -> list[str]:
    """A new dataset (a random name unless given) with n pending 64 px tiny-model jobs; their ids, sorted."""
    name = dataset or f"jobs-{uuid.uuid4().hex[:8]}"
    ids = sorted(uuid.uuid4().hex for _ in range(n))
    with engine.begin() as conn:
        conn.execute(Dataset.__table__.insert().values(name=name, created_at=utcnow()))
        ds = conn.execute(select(Dataset.id).where(Dataset.name == name)).scalar_one()
        conn.execute(
            Job.__table__.insert(),
            [
                dict(
                    id=job_id,
                    dataset_id=ds,
                    prompt=f"p{k}",
                    seed=k,
                    width=64,
                    height=64,
                    num_inference_steps=4,
                    guidance_scale=0.0,
                    model="tiny",
                    status="pending",
                    attempts=0,
                    created_at=utcnow(),
                )
                for k, job_id in enumerate(ids)
            ],
        )
    return ids

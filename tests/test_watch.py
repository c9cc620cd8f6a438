"""`farm status --watch` draws one bar per dataset and returns once they are finished."""

from __future__ import annotations

import io

from rich.console import Console

from farm.cli.watch import watch_datasets
from farm.store.queries import DatasetStatus


def _status(name: str, done: int, total: int) -> DatasetStatus:
    counts = {"pending": 0, "queued": total - done, "running": 0, "succeeded": done, "failed": 0, "canceled": 0}
    return DatasetStatus(name, counts, 1.0, float(total - done))


def test_one_bar_per_dataset_until_all_are_finished() -> None:
    frames = iter(
        [
            [_status("cats", 0, 4), _status("dogs", 1, 2)],
            [_status("cats", 2, 4), _status("dogs", 2, 2)],
            [_status("cats", 4, 4), _status("dogs", 2, 2)],
        ]
    )
    reads: list[int] = []

    def read() -> list[DatasetStatus]:
        reads.append(1)
        return next(frames)

    out = io.StringIO()
    final = watch_datasets(read, interval_s=0, console=Console(file=out, width=120, force_terminal=False))
    assert len(reads) == 3  # stopped as soon as both were finished, not before
    assert [(s.name, s.finished) for s in final] == [("cats", 4), ("dogs", 2)]
    text = out.getvalue()
    assert "cats" in text and "dogs" in text and "4/4" in text and "2/2" in text


def test_pool_bars_show_each_pools_share(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pool_progress counts, per pool, the watched datasets' images its workers finished and hold."""
    import uuid

    from farm.store.engine import ensure_schema, make_engine
    from farm.store.fleet import Heartbeat, beat
    from farm.store.queries import pool_progress
    from farm.store.schema import Dataset, Job, utcnow

    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    with engine.begin() as conn:
        for name, pool in (("w1", "small"), ("w2", "big"), ("w3", "big")):
            beat(conn, Heartbeat(name, pool, "h", 1, "cpu", None, {}, 0, 1.5, utcnow()))
        conn.execute(
            Dataset.__table__.insert(),
            [dict(id=1, name="cats", created_at=utcnow()), dict(id=2, name="other", created_at=utcnow())],
        )
        rows = [
            ("w1", "succeeded", 1),
            ("w1", "running", 1),
            ("w2", "succeeded", 1),
            ("w3", "succeeded", 1),
            ("w3", "succeeded", 2),
            ("w2", "queued", 1),
        ]
        conn.execute(
            Job.__table__.insert(),
            [
                dict(
                    id=uuid.uuid4().hex,
                    dataset_id=ds,
                    prompt="p",
                    seed=i,
                    width=64,
                    height=64,
                    num_inference_steps=4,
                    guidance_scale=0.0,
                    model="tiny",
                    status=state,
                    attempts=1,
                    worker=worker,
                    created_at=utcnow(),
                )
                for i, (worker, state, ds) in enumerate(rows)
            ],
        )
    pools = {p.pool: p for p in pool_progress(engine, ["cats"], beat_s=10)}
    assert (pools["small"].succeeded, pools["small"].running, pools["small"].workers_alive) == (1, 1, 1)
    assert (pools["big"].succeeded, pools["big"].running, pools["big"].workers_alive) == (2, 0, 2)
    assert pools["big"].images_per_s == 3.0

    out = io.StringIO()
    frames = iter([[_status("cats", 3, 4)], [_status("cats", 4, 4)]])
    watch_datasets(
        lambda: next(frames),
        interval_s=0,
        console=Console(file=out, width=140, force_terminal=False),
        read_pools=lambda: pool_progress(engine, ["cats"], beat_s=10),
    )
    assert "pool big" in out.getvalue() and "pool small" in out.getvalue() and "2 workers alive" in out.getvalue()

"""Yield-targeted lines in the store: tries, seeds, verdicts in try order, follow-up tries, rules kept per line.

The scores here are given (the worker's scorers are tested in tests/test_scoring.py and, end to end with a real
`farm worker`, in tests/test_yield.py); what is tested is what the store decides from them, on SQLite and on
PostgreSQL.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from farm.errors import InvalidSubmission
from farm.job import Scores, derive_seed
from farm.storage import StoredObject
from farm.store import transitions
from farm.store.counts import counted_jobs, stored_counts
from farm.store.engine import ensure_schema, make_engine
from farm.store.schema import AcceptanceLine, Dataset, Job, JobEmbedding
from farm.submit.inputs import Row
from farm.submit.plan import SubmitOptions, plan_rows
from farm.submit.record import record

STORED = StoredObject(uri="file:///x.png", key="x.png", sha256="ab" * 32, bytes=10)
MODELS = json.dumps({"clip": "test-clip"})


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
        ensure_schema(eng, auto_upgrade=True)
    else:
        eng = make_engine(request.getfixturevalue("own_pg_url"))
    yield eng
    eng.dispose()


def _submit(engine: Engine, dataset: str, prompts: list[dict[str, object]], **rules: object) -> list[str]:
    rows = [Row("prompts.jsonl", n, dict(p)) for n, p in enumerate(prompts, start=1)]
    options = SubmitOptions(dataset=dataset, model="tiny", width=64, height=64, seed=7, **rules)  # type: ignore[arg-type]
    plan = plan_rows(rows, options, base_dir=None)
    record(engine, plan)
    return plan.ids


def _embedding(*values: float) -> bytes:
    norm = sum(v * v for v in values) ** 0.5
    return struct.pack(f"<{len(values)}e", *(v / norm for v in values))


def _finish(
    engine: Engine,
    job_id: str,
    *,
    clip: float = 30.0,
    pixels: str | None = None,
    vector: bytes | None = None,
    stored: StoredObject = STORED,
) -> list[str]:
    """Claim and record one job with these scores, as a worker's recording transaction does."""
    deletes: list[str] = []
    with engine.begin() as conn:
        (claimed,) = transitions.claim(conn, [job_id], worker="w#1", lease_s=60, max_attempts=3)
    scores = Scores(
        pixel_sha256=pixels or job_id * 2,
        clip_score=clip,
        embedding=vector or _embedding(1.0, float(int(job_id[:6], 16)), 0.5, -1.0),
        models=MODELS,
    )
    with engine.begin() as conn:
        marked = transitions.mark_succeeded_many(
            conn, [(job_id, claimed.claim_seq, stored, 5)], worker="w#1", scores={job_id: scores}, deletes=deletes
        )
    assert marked == {job_id}
    return deletes


def _tries(engine: Engine, dataset: str) -> list[tuple[int, int, str, str | None, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(Job.try_index, Job.seed, Job.status, Job.verdict, Job.verdict_reason)
            .join(Dataset, Dataset.id == Job.dataset_id)
            .where(Dataset.name == dataset)
            .order_by(Job.try_index)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def _line(engine: Engine, dataset: str) -> tuple[int, int, int]:
    with engine.connect() as conn:
        row = conn.execute(
            select(AcceptanceLine.tries, AcceptanceLine.decided, AcceptanceLine.accepted)
            .join(Dataset, Dataset.id == AcceptanceLine.dataset_id)
            .where(Dataset.name == dataset)
        ).one()
    return tuple(row)  # type: ignore[return-value]


def _ids_by_try(engine: Engine, dataset: str) -> dict[int, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(Job.try_index, Job.id).join(Dataset, Dataset.id == Job.dataset_id).where(Dataset.name == dataset)
        ).all()
    return {int(k): str(i) for k, i in rows}


def test_the_first_tries_are_the_images_per_prompt_jobs(engine: Engine) -> None:
    plain = plan_rows(
        [Row("p.txt", 1, {"prompt": "a cat"})],
        SubmitOptions(dataset="d", model="tiny", width=64, height=64, seed=7, images_per_prompt=3),
        base_dir=None,
    )
    ids = _submit(engine, "d", [{"prompt": "a cat"}], accept=3, min_clip_score=25.0)
    assert ids == plain.ids  # the same jobs: same seeds, same ids
    tries = _tries(engine, "d")
    assert [(k, seed) for k, seed, *_ in tries] == [(k, derive_seed(7, "a cat", 0, k)) for k in range(3)]
    assert _line(engine, "d") == (3, 0, 0)
    with engine.connect() as conn:
        assert conn.execute(select(Job.line_id).distinct()).scalars().all() == [ids[0]]
        assert conn.execute(select(Dataset.accept_target)).scalar_one() == 3


def test_verdicts_are_decided_in_try_order_whatever_finishes_first(engine: Engine) -> None:
    outcomes = []
    for dataset, order in (("first-to-last", (0, 1)), ("last-to-first", (1, 0))):
        _submit(engine, dataset, [{"prompt": "a cat"}], accept=2, max_tries=4, min_clip_score=25.0)
        by_try = _ids_by_try(engine, dataset)
        clip = {0: 10.0, 1: 30.0}  # try 0 misses the bar, try 1 meets it
        for k in order:
            _finish(engine, by_try[k], clip=clip[k])
            if order == (1, 0) and k == 1:
                # Try 1 is in, but try 0 is not: its verdict waits, and no follow-up is added yet.
                assert [t[3] for t in _tries(engine, dataset)] == [None, None]
        outcomes.append([(k, seed, status, verdict) for k, seed, status, verdict, _ in _tries(engine, dataset)])
        assert _line(engine, dataset) == (3, 2, 1)
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == [
        (0, derive_seed(7, "a cat", 0, 0), "succeeded", "rejected"),
        (1, derive_seed(7, "a cat", 0, 1), "succeeded", "accepted"),
        (2, derive_seed(7, "a cat", 0, 2), "pending", None),  # the follow-up try, a derived seed
    ]
    assert "clip score 10.00 < 25" in (_tries(engine, "first-to-last")[0][4] or "")


def test_a_line_stops_at_its_accepted_images_or_its_last_try(engine: Engine) -> None:
    _submit(engine, "short", [{"prompt": "a dog"}], accept=1, max_tries=3, min_clip_score=50.0)
    for k in range(3):
        _finish(engine, _ids_by_try(engine, "short")[k], clip=20.0)
    assert [t[3] for t in _tries(engine, "short")] == ["rejected"] * 3
    assert _line(engine, "short") == (3, 3, 0)  # 3 tries spent, none accepted, nothing more added

    _submit(engine, "met", [{"prompt": "a dog"}], accept=1, max_tries=3, min_clip_score=50.0)
    _finish(engine, _ids_by_try(engine, "met")[0], clip=60.0)
    assert [t[3] for t in _tries(engine, "met")] == ["accepted"]
    assert _line(engine, "met") == (1, 1, 1)


def test_duplicates_by_pixels_and_by_embedding(engine: Engine) -> None:
    _submit(engine, "dups", [{"prompt": "a bird"}], accept=3, max_tries=6, dedup=0.95)
    by_try = _ids_by_try(engine, "dups")
    _finish(engine, by_try[0], pixels="p0", vector=_embedding(1.0, 0.0, 0.0, 0.0))
    _finish(engine, by_try[1], pixels="p0", vector=_embedding(0.0, 1.0, 0.0, 0.0))  # same pixels as try 0
    _finish(engine, by_try[2], pixels="p2", vector=_embedding(1.0, 0.1, 0.0, 0.0))  # cosine 0.995 with try 0
    tries = _tries(engine, "dups")
    assert [t[3] for t in tries[:3]] == ["accepted", "duplicate", "duplicate"]
    assert tries[1][4] == "the same pixels as try 0"
    assert (tries[2][4] or "").startswith("cosine 0.99") and (tries[2][4] or "").endswith("with try 0")
    assert _line(engine, "dups") == (5, 3, 1)  # two follow-ups for the two duplicates
    _finish(engine, _ids_by_try(engine, "dups")[3], pixels="p3", vector=_embedding(0.0, 0.0, 1.0, 0.0))
    assert _tries(engine, "dups")[3][3] == "accepted"


def test_a_try_that_fails_for_good_is_spent_and_the_line_tries_the_next_seed(engine: Engine) -> None:
    _submit(engine, "poison", [{"prompt": "a fish"}], accept=1, max_tries=2)
    first = _ids_by_try(engine, "poison")[0]
    with engine.begin() as conn:
        (claimed,) = transitions.claim(conn, [first], worker="w#1", lease_s=60, max_attempts=1)
        state = transitions.mark_attempt_failed(
            conn, first, worker="w#1", seq=claimed.claim_seq, error="x", max_attempts=1
        )
    assert state is not None and state.value == "failed"
    assert _line(engine, "poison") == (2, 1, 0)
    _finish(engine, _ids_by_try(engine, "poison")[1])
    assert [t[2:4] for t in _tries(engine, "poison")] == [("failed", None), ("succeeded", "accepted")]


def test_keep_rejected_no_deletes_the_image_in_the_verdicts_step(engine: Engine) -> None:
    _submit(engine, "tidy", [{"prompt": "a fox"}], accept=1, max_tries=2, min_clip_score=25.0, keep_rejected=False)
    image = StoredObject(uri="file:///store/tidy/rejected.png", key="tidy/rejected.png", sha256="cd" * 32, bytes=9)
    deletes = _finish(engine, _ids_by_try(engine, "tidy")[0], clip=5.0, stored=image)
    assert deletes == [image.uri]
    with engine.connect() as conn:
        row = conn.execute(select(Job.output_uri, Job.verdict_reason).where(Job.try_index == 0)).one()
    assert row.output_uri is None and "image deleted" in row.verdict_reason


def test_a_line_keeps_the_rules_of_its_first_submit(engine: Engine) -> None:
    prompts = [{"prompt": "a cat"}, {"prompt": "a dog", "accept": 2}]
    _submit(engine, "rules", prompts, accept=1, min_clip_score=25.0)
    with engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(Job)).scalar_one()
    _submit(engine, "rules", prompts, accept=1, min_clip_score=25.0)  # the same file again: nothing new
    with pytest.raises(InvalidSubmission) as other:
        _submit(engine, "rules", prompts, accept=1, min_clip_score=30.0)
    assert "prompts.jsonl:1: field 'min_clip_score'" in str(other.value)
    assert "min-clip-score: was 25.0, now 30.0" in str(other.value)
    with pytest.raises(InvalidSubmission) as without:
        _submit(engine, "rules", [{"prompt": "a cat"}])
    assert "first submitted with acceptance rules" in str(without.value)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Job)).scalar_one() == before == 3
        assert conn.execute(select(func.count()).select_from(AcceptanceLine)).scalar_one() == 2


def test_bad_rules_name_the_row_and_field() -> None:
    def plan(fields: dict[str, object], **options: object) -> None:
        plan_rows(
            [Row("p.jsonl", 4, fields)],
            SubmitOptions(dataset="d", model="tiny", **options),  # type: ignore[arg-type]
            base_dir=None,
        )

    with pytest.raises(InvalidSubmission, match=r"p.jsonl:4: field 'dedup': dedup must be in \(0, 1\], got 1.5"):
        plan({"prompt": "x", "dedup": 1.5})
    with pytest.raises(InvalidSubmission, match=r"p.jsonl:4: field 'max_tries': max_tries must be at least accept"):
        plan({"prompt": "x", "accept": 3, "max_tries": 2})
    with pytest.raises(InvalidSubmission, match=r"field 'safety': safety must be one of drop, flag, got 'maybe'"):
        plan({"prompt": "x"}, safety="maybe")
    with pytest.raises(InvalidSubmission, match=r"field 'scorer': unknown scorer"):
        plan({"prompt": "x", "min_clip_score": 20}, scorer="no-such-scorer")


def test_verdict_counts_follow_the_verdicts(engine: Engine) -> None:
    _submit(engine, "counts", [{"prompt": "a"}, {"prompt": "b"}], accept=1, max_tries=3, min_clip_score=25.0)
    by_line: list[str] = []
    with engine.connect() as conn:
        by_line = conn.execute(select(Job.id).where(Job.try_index == 0).order_by(Job.id)).scalars().all()
    _finish(engine, by_line[0], clip=10.0)
    _finish(engine, by_line[1], clip=40.0)
    with engine.connect() as conn:
        ds = conn.execute(select(Dataset.id).where(Dataset.name == "counts")).scalar_one()
        truth, stored = counted_jobs(conn, ds), stored_counts(conn, ds)
    assert stored == truth
    assert (stored["accepted"], stored["rejected"], stored["pending"]) == (1, 1, 1)


def test_an_undecided_try_holds_the_accepted_only_exports_watermark(engine: Engine, tmp_path: Path) -> None:
    from farm.outputs.export import export_dataset
    from farm.storage import object_key, open_storage

    storage = open_storage((tmp_path / "store").as_uri())
    _submit(engine, "exp", [{"prompt": "a cat"}], accept=2, max_tries=2, min_clip_score=25.0)
    by_try = _ids_by_try(engine, "exp")

    def finish(k: int, clip: float) -> None:
        _finish(engine, by_try[k], clip=clip, stored=storage.put(object_key("", "exp", by_try[k], 1), b"png %d" % k))

    def export() -> list[str]:
        export_dataset(engine, storage, "exp", fmt="jsonl", to=str(tmp_path / "out"), settle_s=0)
        lines = [line for part in sorted((tmp_path / "out").glob("*.jsonl")) for line in part.read_text().splitlines()]
        return [json.loads(line)["try_index"] for line in lines]

    finish(1, 40.0)  # accepted-to-be, but its verdict waits for try 0
    assert export() == []  # the undecided try holds the watermark: nothing passes it
    finish(0, 10.0)  # try 0 rejected; try 1 accepted
    assert export() == [1]
    with pytest.raises(ValueError, match="holds an export of only accepted images"):
        export_dataset(engine, storage, "exp", fmt="jsonl", to=str(tmp_path / "out"), settle_s=0, accepted_only=False)


def test_a_rejected_image_whose_delete_never_happened_is_collected_by_gc(engine: Engine, tmp_path: Path) -> None:
    from farm.outputs.gc import collect
    from farm.storage import object_key, open_storage

    storage = open_storage((tmp_path / "store").as_uri())
    _submit(engine, "gc", [{"prompt": "a fox"}], accept=1, max_tries=2, min_clip_score=25.0, keep_rejected=False)
    job_id = _ids_by_try(engine, "gc")[0]
    stored = storage.put(object_key("", "gc", job_id, 1), b"a rejected image")
    deletes = _finish(engine, job_id, clip=5.0, stored=stored)
    assert deletes == [stored.uri]  # the worker would delete it now; say it died first
    assert storage.head(stored.key) is not None
    collect(engine, storage, dataset="gc")
    assert storage.head(stored.key) is None


def test_concurrent_recorders_on_postgresql_reach_the_try_order_outcome(own_pg_url: str) -> None:
    """Six threads record the tries of the same lines at once, in shuffled order, round after round: every line
    ends exactly as the rules replayed in try order say (no lost follow-up, no try twice, no deadlock)."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    engine = make_engine(own_pg_url)
    prompts = [{"prompt": f"line {n}"} for n in range(3)]
    _submit(engine, "race", prompts, accept=6, max_tries=16, min_clip_score=50.0)

    def clip_of(seed: int) -> float:
        return float(seed % 100)  # a fixed score per seed: about half the tries miss the bar

    def finish(job_id: str, seed: int) -> None:
        _finish(engine, job_id, clip=clip_of(seed))

    shuffle = random.Random(5)
    with ThreadPoolExecutor(max_workers=6) as pool:
        while True:
            with engine.connect() as conn:
                pending = conn.execute(select(Job.id, Job.seed).where(Job.status == "pending")).all()
            if not pending:
                break
            shuffle.shuffle(pending)
            list(pool.map(lambda row: finish(row.id, row.seed), pending))
    with engine.connect() as conn:
        jobs = conn.execute(select(Job.prompt, Job.try_index, Job.seed, Job.verdict)).all()
    engine.dispose()
    for prompt in (p["prompt"] for p in prompts):
        tries = sorted((j for j in jobs if j.prompt == prompt), key=lambda j: j.try_index)
        expected, total = [], 6
        for k in range(16):
            if k >= total:
                break
            ok = clip_of(derive_seed(7, str(prompt), 0, k)) >= 50.0
            expected.append("accepted" if ok else "rejected")
            if not ok and total < 16:
                total += 1
        assert [(j.try_index, j.verdict) for j in tries] == list(enumerate(expected)), prompt
        assert [j.seed for j in tries] == [derive_seed(7, str(prompt), 0, k) for k in range(len(tries))]


def test_a_batch_is_recorded_under_each_jobs_own_fence(engine: Engine) -> None:
    """mark_succeeded_many (one set-based UPDATE on PostgreSQL): each row keeps its own fence, scores and recipe."""
    ids = _submit(engine, "batch", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}], accept=1, min_clip_score=25.0)
    with engine.begin() as conn:
        claimed = {c.id: c for c in transitions.claim(conn, ids, worker="w#1", lease_s=60, max_attempts=3)}
    scores = {
        job_id: Scores(pixel_sha256=job_id * 2, clip_score=30.0, embedding=_embedding(1, 2), models=MODELS)
        for job_id in ids
    }
    done = [(job_id, claimed[job_id].claim_seq, STORED, 7) for job_id in ids]
    done[1] = (ids[1], claimed[ids[1]].claim_seq + 1, STORED, 7)  # a stale attempt: fenced out
    with engine.begin() as conn:
        marked = transitions.mark_succeeded_many(
            conn, done, worker="w#1", recipes={job_id: '{"r": 1}' for job_id in ids}, scores=scores
        )
    assert marked == {ids[0], ids[2]}
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(Job.id, Job.status, Job.clip_score, Job.recipe, Job.verdict))}
        embedded = set(conn.execute(select(JobEmbedding.job_id)).scalars())
    assert [rows[i].status for i in ids] == ["succeeded", "running", "succeeded"]
    assert (rows[ids[0]].clip_score, rows[ids[0]].recipe, rows[ids[0]].verdict) == (30.0, '{"r": 1}', "accepted")
    assert rows[ids[1]].clip_score is None and embedded == {ids[0], ids[2]}

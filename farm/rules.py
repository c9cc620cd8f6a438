"""A yield-targeted line's acceptance rules: shared by submit (farm/submit/rules.py reads them from rows and
options) and the store (farm/store/verdicts.py decides by them)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Rules:
    """One line's rules. Thresholds are inclusive: a score equal to the bar passes."""

    accept: int
    max_tries: int
    min_clip_score: float | None = None  # CLIP score, 100·max(cos, 0)
    min_aesthetic: float | None = None  # the aesthetic predictor's 1-10 scale
    safety: str | None = None  # "drop": flagged images are rejected; "flag": kept, flagged in the row
    dedup: float | None = None  # a cosine similarity: a try this close to an accepted one is a duplicate
    keep_rejected: bool = True  # False: rejected images are deleted from storage when the verdict is recorded
    scorer: str | None = None  # the scorer profile; set whenever a rule needs scores

    @property
    def needs_scores(self) -> bool:
        return any(v is not None for v in (self.min_clip_score, self.min_aesthetic, self.safety, self.dedup))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Rules:
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def differences(self, other: Rules) -> list[str]:
        """The rules whose values differ, as `name: was X, now Y`."""
        return [
            f"{f.name.replace('_', '-')}: was {getattr(self, f.name)!r}, now {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def describe(self) -> str:
        bar = [
            f"clip ≥ {self.min_clip_score:g}" if self.min_clip_score is not None else "",
            f"aesthetic ≥ {self.min_aesthetic:g}" if self.min_aesthetic is not None else "",
            f"safety {self.safety}" if self.safety else "",
            f"dedup {self.dedup:g}" if self.dedup is not None else "",
        ]
        shown = ", ".join(b for b in bar if b) or "no bar"
        return f"{self.accept} accepted in at most {self.max_tries} tries ({shown})"

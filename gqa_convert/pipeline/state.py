"""RUN_DIR/state.json: what each stage last did (fingerprint, status, outputs), one writer, one reader."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, ValidationError

from ..errors import CheckpointError
from ..fileio import read_small_text, write_json_atomic

STATE_FILE = "state.json"


def fingerprint(settings: dict, upstream: str) -> str:
    """A stage's identity: its own settings and the fingerprint of the stage before it."""
    blob = json.dumps({"settings": settings, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageEntry(BaseModel):
    fingerprint: str
    status: Literal["running", "done"]
    outputs: dict[str, Any] = Field(default_factory=dict)
    time: str = ""


class RunState(BaseModel):
    path: Path
    stages: dict[str, StageEntry] = Field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> "RunState":
        path = run_dir / STATE_FILE
        if not path.exists():
            return cls(path=path)
        try:
            data = json.loads(read_small_text(path))
            return cls(path=path, stages=data["stages"])
        except (OSError, ValueError, KeyError, TypeError, ValidationError):
            raise CheckpointError(
                f"{path} is damaged; delete it to re-run every stage (finished outputs in {run_dir} are redone)"
            ) from None

    def entry(self, stage: str) -> Optional[StageEntry]:
        return self.stages.get(stage)

    def is_done(self, stage: str, fp: str) -> bool:
        e = self.stages.get(stage)
        return e is not None and e.fingerprint == fp and e.status == "done"

    def mark(self, stage: str, fp: str, status: Literal["running", "done"], outputs: Optional[dict] = None) -> None:
        self.stages[stage] = StageEntry(
            fingerprint=fp,
            status=status,
            outputs=outputs or {},
            time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        write_json_atomic(self.path, {"stages": {k: v.model_dump() for k, v in self.stages.items()}})

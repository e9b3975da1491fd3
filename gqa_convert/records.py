"""The run records a model folder carries, each one typed model with one writer and one reader.

    gqa_convert.json   ConversionRecord    written by convert (and kept by uptrain)
    uptrain.json       UptrainRecord       written by uptrain, beside the final model
    verification.json  VerificationRecord  written by verify

They are published with the model, so what they publish is names and hub ids, never local paths:
a field that must stay on this machine (the source's absolute path, which lets `verify` find the
source again) is named in the record's LOCAL_ONLY and left out of `published()`, the bytes `push`
uploads. Each has a `schema_version`; a reader accepts files of older versions (missing fields take their defaults)
and ignores keys it does not know, so a newer file still reads. No torch here: the card, the
pipeline and push read them without the training stack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import CheckpointError
from .fileio import write_json_atomic

R = TypeVar("R", bound="Record")
MAX_RECORD_BYTES = 16 << 20  # the largest real record (a long verify's per-position rows) is well under 1 MB


class Record(BaseModel):
    # Reading is lenient (extra keys ignored) so that files written by other versions still load.
    model_config = ConfigDict(extra="ignore")
    FILE: ClassVar[str]
    VERSION: ClassVar[int] = 1
    LOCAL_ONLY: ClassVar[tuple[str, ...]] = ()  # fields never published (local paths)
    schema_version: int = 1

    def _data(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["schema_version"] = self.VERSION
        return data

    def write(self, folder: Union[str, Path]) -> Path:
        """The one writer: FOLDER/FILE, atomically (never half-written)."""
        return write_json_atomic(Path(folder) / self.FILE, self._data())

    def published(self) -> bytes:
        """The file as it goes to the hub: without the LOCAL_ONLY fields."""
        data = {k: v for k, v in self._data().items() if k not in self.LOCAL_ONLY}
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def read(cls: type[R], folder: Union[str, Path]) -> Optional[R]:
        """The one reader: the record in FOLDER, None when there is none, CheckpointError when it
        is damaged (one line, saying what to re-run)."""
        path = Path(folder) / cls.FILE
        if not path.exists() and not path.is_symlink():
            return None
        # A record that is a device, FIFO or folder (a symlink to /dev/zero) would be read forever
        # or treated as absent; one far past any real record's size is not one either.
        if not path.is_file():
            raise CheckpointError(f"{path} is not a regular file; remove it and re-run the step that wrote it")
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise CheckpointError(
                f"{path} is {path.stat().st_size >> 20} MB, not a run record (at most {MAX_RECORD_BYTES >> 20} MB); "
                "re-run the step that wrote it"
            )
        try:
            data = json.loads(path.read_text())
            return cls.model_validate(data)
        except (json.JSONDecodeError, UnicodeDecodeError, ValidationError, RecursionError) as err:
            first = str(err).splitlines()[0][:120]
            raise CheckpointError(f"{path} is damaged ({first}); re-run the step that wrote it") from None


class Heads(BaseModel):
    n_heads: int
    n_kv: int
    head_dim: int


class HeadLayout(Heads):
    hidden: int


class ConversionRecord(Record):
    FILE: ClassVar[str] = "gqa_convert.json"
    LOCAL_ONLY: ClassVar[tuple[str, ...]] = ("source_path",)  # dropped from the published copy
    version: str = ""  # gqa-convert's
    source: str = "unknown"  # a hub id or alias as given; a local folder by its name only
    source_repo: Optional[str] = None  # the alias's hub repo
    # A local source's absolute path, so `verify` and `uptrain` find it again from any directory.
    # Local only: `push` publishes the record without it (LOCAL_ONLY).
    source_path: Optional[str] = None
    revision: Optional[str] = None  # the hub revision as given (branch, tag or commit)
    source_commit: Optional[str] = None  # the hub commit the weights came from (the cache snapshot's)
    family: str = ""
    old: Optional[HeadLayout] = None
    new: Optional[HeadLayout] = None
    method: str = "mean"
    report: dict[str, Any] = Field(default_factory=dict)  # per layer (and "summary") from a merge method
    query_heads: Optional["QueryHeads"] = None  # the query-head change (convert q_heads); None: unchanged

    def find_source(self) -> Optional[tuple[str, Optional[str]]]:
        """Where the source is now, as (spec, revision) for `resolve_source`: the recorded local path
        while it is still there, else the hub id at the commit the weights came from; None when
        neither (a local source moved or deleted, or a record without a source)."""
        if self.source_path:  # a local source
            return (self.source_path, None) if Path(self.source_path).exists() else None
        at = self.source_commit or self.revision
        if self.source_repo:  # an alias
            return self.source_repo, at
        if self.source != "unknown" and "/" in self.source:  # a hub id as given
            return self.source, at
        if self.source != "unknown" and Path(self.source).exists():  # an older record: a folder's name
            return self.source, None
        return None


class QueryHeadLayer(BaseModel):
    """One layer of a query-head reduction (gqa_convert.merge.qheads.LayerChoice)."""

    scores: list[float]  # per old query head: mean squared norm of its o_proj output per token
    kept: list[int]  # old query-head indices kept
    selection: str  # "scores" or "greedy"
    rel_error_prune: float  # relative block-output error with o_proj's columns unchanged
    rel_error_merge: Optional[float] = None  # with the least-squares o_proj (merge only)


class QueryHeads(BaseModel):
    """The query-head change of a conversion (gqa_convert.merge.qheads.QueryHeadReport)."""

    old: int
    new: int
    method: str  # "prune" or "merge"
    calibration_tokens: int
    calibration_cache: str = ""  # the cache folder's name
    layers: dict[str, QueryHeadLayer] = Field(default_factory=dict)
    summary: dict[str, Optional[float]] = Field(default_factory=dict)  # mean rel_error_* over layers


ConversionRecord.model_rebuild()


class UptrainRecord(Record):
    """What uptraining did: its settings (local paths by name) and what it measured."""

    FILE: ClassVar[str] = "uptrain.json"
    model: Optional[str] = None  # the converted model it started from, by name
    data: Optional[str] = None  # the text, by name or dataset id
    dataset_id: Optional[str] = None
    context: Optional[int] = None
    steps: int = 0
    tokens: int = 0  # training tokens consumed
    final_loss: Optional[float] = None  # mean training loss of the last step (one noisy batch)
    eval_loss: Optional[float] = None  # held-out loss at the end of training, on eval_slice
    eval_slice: Optional[str] = None  # which held-out documents, e.g. "documents[0:50]"
    tokens_per_s: Optional[float] = None
    attn_implementation: Optional[str] = None
    heldout_docs: Optional[int] = None
    train_start: Optional[int] = None
    resumed_from: int = 0
    settings: dict[str, Any] = Field(default_factory=dict)  # UptrainSettings as run
    command: Optional[str] = None


class Check(BaseModel):
    name: str
    passed: bool
    detail: str


class DataUsed(BaseModel):
    name: str
    dataset_id: Optional[str] = None
    documents: int
    tokens: int
    selection: str


class LossReport(BaseModel):
    source: float
    converted: float
    source_perplexity: float
    converted_perplexity: float
    delta: float  # the law's change for this head change
    predicted: float  # source + delta
    tolerance: float
    limit: float  # predicted + tolerance
    law: str
    notes: list[str] = Field(default_factory=list)
    by_position: list[PositionRow] = Field(default_factory=list)  # does the model still use its long context?
    plot: Optional[str] = None  # loss by position, source vs converted (PNG in the model folder)


class PositionRow(BaseModel):
    """Mean held-out loss of the tokens at positions [start, end) of their documents."""

    start: int
    end: int
    tokens: int
    source: float
    converted: float


class CostRow(BaseModel):
    measured: int
    predicted: int
    rel_error: float


class CostPair(BaseModel):
    source: CostRow
    converted: CostRow


class CostReport(BaseModel):
    dtype: str
    limit: float
    kv_cache_bytes: CostPair
    flops_per_token: CostPair
    cache_tokens: dict[str, list[int]] = Field(default_factory=dict)


class Params(BaseModel):
    source_non_embedding: int
    converted_non_embedding: int


class RetrievalTask(BaseModel):
    """One task's accuracy by model ("source", "converted") and prompt length."""

    task: str
    scores: dict[str, dict[int, float]] = Field(default_factory=dict)
    skipped: dict[int, str] = Field(default_factory=dict)  # length -> why it was not run (too short, ...)


class RetrievalReport(BaseModel):
    """Long-context retrieval on identical prompts for every model (gqa_convert.evals)."""

    context: int
    lengths: list[int]
    depths: list[float]
    samples: int
    seed: int
    tasks: list[RetrievalTask] = Field(default_factory=list)
    passkey_grid: dict[str, list[list[float]]] = Field(default_factory=dict)  # model -> [length][depth]
    prompts_sha256: Optional[str] = None
    ratio: Optional[float] = None  # converted / source mean accuracy (None: no source, or source scores 0)
    notes: list[str] = Field(default_factory=list)
    plot: Optional[str] = None  # the heat map PNG, relative to the model folder

    def mean(self, model: str) -> Optional[float]:
        values = [v for t in self.tasks for v in t.scores.get(model, {}).values()]
        return sum(values) / len(values) if values else None


class RetrievalRecord(Record):
    """retrieval.json: what `gqa-convert eval` measured (verify puts the same in verification.json)."""

    FILE: ClassVar[str] = "retrieval.json"
    model: str
    source: Optional[str] = None
    report: RetrievalReport


class VerificationRecord(Record):
    FILE: ClassVar[str] = "verification.json"
    passed: bool = Field(strict=True)  # "yes" or 1 is a damaged record, never a pass
    reasons: list[str] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    model: str
    weights_sha256: dict[str, str] = Field(default_factory=dict)  # ties the verdict to the exact weights
    source: str
    source_id: Optional[str] = None  # hub repo id of the source, when it has one
    source_path: Optional[str] = None  # never written by verify (published); a caller may record one
    source_licence: Optional[dict[str, str]] = None
    context: int
    data: DataUsed
    heads: dict[str, Heads]  # "source", "converted"
    params: Params
    loss: LossReport
    costs: CostReport
    retrieval: Optional[RetrievalReport] = None
    versions: dict[str, str] = Field(default_factory=dict)
    created: str = ""
    command: Optional[str] = None

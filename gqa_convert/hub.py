"""`gqa-convert push`: publish a verified model folder to the hub in one commit.

What goes up is an allow-list: safetensors shards and their index, config and generation config,
tokenizer files, licence files, the model card (README.md), verification.json and the PNG plots.
Pickle files (*.bin, *.pt, *.pkl, ...), optimizer states and training checkpoints never do.
The push refuses a folder whose verification.json is missing or failed unless `--force`, and
validates the card's YAML before anything is sent. Everything lands in ONE commit, which the hub
applies atomically: after a failure nothing is half-uploaded and re-running the command completes.

The token comes from huggingface_hub's usual sources (`--token`, HF_TOKEN, `hf auth login`); it
is passed to the client only, never printed or written.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import (
    AccessError,
    CheckpointError,
    ConfigError,
    SourceNotFoundError,
    VerificationFailed,
)  # fmt: skip
from .fileio import write_text_atomic
from .huberrors import _first_line, hub_error
from .records import ConversionRecord, VerificationRecord
from .settings import is_repo_id

# What a published model folder holds (matched against the path relative to the folder).
UPLOAD_PATTERNS = [
    "*.safetensors", "model.safetensors.index.json",
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "README.md", "verification.json", "gqa_convert.json", "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY.md",
    "*.png", "plots/*.png",
]  # fmt: skip
# Never uploaded, whatever the folder holds: pickle can run code on load; training state is private.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
TRAINING_STATE = ("optimizer*", "scheduler*", "rng_state*", "trainer_state*", "training_args*")
TRAINING_DIRS = ("checkpoint", "checkpoints", "checkpoint-*", "checkpoint.*", "runs", "logs", ".cache", ".*")
MAX_FILE_BYTES = 50 * 1000**3  # the hub refuses single files over 50 GB
KEPT_REMOTE = {".gitattributes"}  # the hub's own file: a push never deletes it


@dataclass
class UploadPlan:
    """The files a push sends (path relative to the folder, bytes) and those it leaves, with why."""

    folder: Path
    files: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


@dataclass
class PushResult:
    repo_id: str
    revision: str
    plan: UploadPlan
    commit_url: Optional[str] = None  # None for a dry run
    commit_oid: Optional[str] = None
    refusal: Optional[str] = None  # dry run only: why a real push would be refused
    deleted: list[str] = field(default_factory=list)  # files an earlier push left, removed in the same commit


def plan_upload(folder: Path) -> UploadPlan:
    """Sort the folder's files into uploaded and skipped; refuse a folder with no safetensors weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceNotFoundError(f"{folder} is not a folder: pass the converted model's output folder")
    plan = UploadPlan(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        parts = rel.split("/")
        name = parts[-1]
        if any(fnmatch.fnmatch(part, pat) for part in parts[:-1] for pat in TRAINING_DIRS):
            plan.skipped.append((rel, "training run state"))
        elif name.lower().endswith(PICKLE_SUFFIXES):
            plan.skipped.append((rel, "pickle file: never published"))
        elif any(fnmatch.fnmatch(name, pat) for pat in TRAINING_STATE):
            plan.skipped.append((rel, "training state"))
        elif any(fnmatch.fnmatch(rel, pat) for pat in UPLOAD_PATTERNS) and (
            len(parts) == 1 or rel.startswith("plots/")
        ):
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise CheckpointError(
                    f"{rel} is {size / 1e9:.1f} GB; the hub refuses files over 50 GB: "
                    "re-save with a smaller max shard size"
                )
            plan.files.append((rel, size))
        else:
            plan.skipped.append((rel, "not part of a published model"))
    names = {rel for rel, _ in plan.files}
    if "config.json" not in names:
        raise CheckpointError(
            f"{folder} has no config.json: pass a converted model folder (gqa-convert convert ... -o DIR)"
        )
    if not any(rel.endswith(".safetensors") for rel in names):
        pickles = [rel for rel, why in plan.skipped if why.startswith("pickle")]
        hint = f" (it holds pickle weights {pickles[0]}, which are never published)" if pickles else ""
        raise CheckpointError(f"{folder} has no safetensors weights{hint}: save the model with safe_serialization")
    return plan


def check_verification(folder: Path) -> dict:
    """verification.json of the folder if it passed; else VerificationFailed saying why and what to run."""
    how = f"run `gqa-convert verify {folder} --source SOURCE --data TEXT --context T` (or push with --force)"
    # The one typed reader: a damaged record (not JSON, a list, `passed: "yes"`, /dev/zero) is a
    # CheckpointError (exit 2) naming the file, never read as a verdict.
    record = VerificationRecord.read(folder)
    if record is None:
        raise VerificationFailed(f"{folder} has no verification.json, so nothing shows it matches the law: {how}")
    if not record.passed:
        reasons = "; ".join(record.reasons)[:200] or "no pass recorded"
        raise VerificationFailed(
            f"verification failed ({reasons}): uptrain further and re-verify, or push with --force"
        )
    from .verify import weights_digest

    if record.weights_sha256 != weights_digest(folder):
        raise VerificationFailed(f"the weights in {folder} changed since verification.json was written: {how}")
    return record.model_dump(mode="json")


def _card_needs_repo_id(folder: Path) -> bool:
    """No README.md yet, or the one `verify` wrote with a REPO_ID placeholder in its usage snippet."""
    path = Path(folder) / "README.md"
    return not path.is_file() or 'from_pretrained("REPO_ID")' in path.read_text(errors="replace")


def _completed_card(folder: Path, repo_id: str) -> str:
    """The card as push uploads it: rendered when missing, else with the repo id filled into its
    usage snippet (any edits kept). Nothing is written: the local card changes only after the
    commit has landed, so a failed push leaves the folder as it was."""
    from .card import render_card

    path = Path(folder) / "README.md"
    if not path.is_file():
        return render_card(folder, repo_id=repo_id)
    return path.read_text().replace('from_pretrained("REPO_ID")', f'from_pretrained("{repo_id}")')


def validate_card(folder: Path, *, remote: bool, token: Optional[str] = None, text: Optional[str] = None) -> None:
    """Parse README.md's YAML metadata (and model-index) locally; with `remote`, ask the hub's
    validator too. `text`: the card to check instead of the file (the one push is about to upload)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    if text is None:
        if not path.is_file():
            raise CheckpointError(
                f"{folder} has no README.md model card: run `gqa-convert verify` (it writes the card)"
            )
        text = path.read_text()
    if not text.startswith("---"):
        raise ConfigError(f"{path} has no YAML metadata block (--- ... ---) at the top: regenerate the card")
    try:
        card = ModelCard(text)
        card.data.to_dict()  # model-index parsed into eval results and back
    except Exception as err:  # ValueError from the parser, or a model-index that does not parse
        raise ConfigError(f"{path}: invalid card metadata ({str(err).splitlines()[0]}); fix the YAML block") from None
    if remote:
        try:
            card.validate(repo_type="model")
        except ValueError as err:  # the validator answered 400: the card's YAML is invalid
            raise ConfigError(f"the hub rejected {path}'s metadata ({_first_line(err)}); fix the YAML block") from None
        except Exception as err:
            raise hub_error(err, "the model card", "validate") from None  # "... to validate the model card"


def _upload_bytes(folder: Path, rel: str, card: Optional[str]):
    """What goes up for `rel`: the completed card, the conversion record without its local-only
    fields (the source's absolute path), else the file itself (streamed from disk)."""
    if rel == "README.md" and card is not None:
        return card.encode()
    if rel == ConversionRecord.FILE:
        record = ConversionRecord.read(folder)
        if record is not None:
            return record.published()
    return str(folder / rel)


def push(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    dry_run: bool = False,
    force: bool = False,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
) -> PushResult:
    """Upload a converted, verified model folder to `repo_id` in one commit.

    Args:
        folder: the model folder (safetensors, config, tokenizer, README.md, verification.json).
        repo_id: `user/name` or `org/name`; created (private if asked) when missing.
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to, created from main when missing; default main.
        dry_run: only plan and validate locally; nothing is sent.
        force: push even when verification is missing or failed.
        token: hub token; default HF_TOKEN or the `hf auth login` token. Never logged.
    Returns:
        PushResult with the plan and, unless dry_run, the commit url and id.
    Raises:
        VerificationFailed, CheckpointError, ConfigError, AccessError, HubError.

    Example:
        >>> push(Path("out/llama-gqa2"), "me/llama-gqa2", dry_run=True)  # doctest: +SKIP
    """
    folder = Path(folder)
    if not is_repo_id(repo_id or ""):
        raise ConfigError(f"--repo must look like user/name or org/name, not {repo_id!r}")
    plan = plan_upload(folder)
    # The conversion record is uploaded re-serialised: a damaged one fails here (exit 2), in a
    # dry run too, rather than listing it as uploadable.
    ConversionRecord.read(folder)
    refusal = None
    if not force:
        try:
            check_verification(folder)
        except VerificationFailed as err:
            if not dry_run:
                raise
            refusal = str(err)  # a dry run still lists the files, then reports the refusal
    branch = revision or "main"
    card = _completed_card(folder, repo_id) if _card_needs_repo_id(folder) else None
    if card is not None and not (folder / "README.md").is_file():
        plan.files.append(("README.md", len(card.encode())))
    validate_card(folder, remote=False, text=card)
    if dry_run:
        return PushResult(repo_id, branch, plan, refusal=refusal)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

    token = token or get_token()
    if not token:
        raise AccessError(
            f"pushing to {repo_id} needs a hub token with write access: log in with `hf auth login` or set HF_TOKEN"
        )
    api = HfApi(token=token)
    validate_card(folder, remote=True, token=token, text=card)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        # The branch becomes exactly this folder's allow-list: files an earlier push left (an old
        # model.safetensors beside new shards would be what from_pretrained loads) are deleted in
        # the same commit, so the repo is never a mix of two models.
        uploads = {rel for rel, _ in plan.files}
        stale = sorted(set(api.list_repo_files(repo_id, revision=branch)) - uploads - KEPT_REMOTE)
        operations: list = [
            CommitOperationAdd(path_in_repo=rel, path_or_fileobj=_upload_bytes(folder, rel, card))
            for rel in sorted(uploads)
        ]
        operations += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload {folder.name} with gqa-convert",
            revision=branch,
        )
    except Exception as err:  # every failure becomes one actionable line
        raise hub_error(err, repo_id, "push to") from None
    if card is not None:  # the commit landed: now the local card names the repo too
        write_text_atomic(folder / "README.md", card)
    return PushResult(repo_id, branch, plan, commit_url=str(info.commit_url), commit_oid=info.oid, deleted=stale)

"""`gqa-convert push DIR --repo USER/NAME`: publish a verified model folder in one commit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..settings import PushSettings
from .flags import add_flags, settings_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "push",
        help="publish a verified model folder to the hub in one commit",
        description="Upload safetensors weights, config, tokenizer, model card, verification.json and plots "
        "in one commit. Refuses unverified or failed folders unless --force; never uploads pickle files.",
    )
    p.add_argument("dir", metavar="DIR", help="converted model folder")
    add_flags(p, PushSettings)
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded and its size; send nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    # Not a setting: a token must never be written into a recipe or run folder.
    p.add_argument("--token", default=None, help="hub token (default: HF_TOKEN or the `hf auth login` token)")
    p.set_defaults(func=run)


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def _as_dict(result, dry_run: bool) -> dict:
    plan = result.plan
    return {
        "repo_id": result.repo_id,
        "revision": result.revision,
        "dry_run": dry_run,
        "files": [{"path": rel, "bytes": size} for rel, size in plan.files],
        "total_bytes": plan.total_bytes,
        "skipped": [{"path": rel, "reason": why} for rel, why in plan.skipped],
        "deleted": result.deleted,
        "commit_url": result.commit_url,
        "commit_oid": result.commit_oid,
        "refusal": result.refusal,
    }


def run(args) -> int:
    from ..errors import VerificationFailed
    from ..hub import push

    s = settings_from_args(PushSettings, args)
    result = push(
        Path(args.dir),
        s.repo,
        private=s.private,
        revision=s.revision,
        dry_run=args.dry_run,
        force=s.force,
        token=args.token,
        commit_message=s.message,
    )
    plan = result.plan
    if args.json:
        print(json.dumps(_as_dict(result, args.dry_run), indent=2))
        if result.refusal:
            print(f"gqa-convert: error: a real push would be refused: {result.refusal}", file=sys.stderr)
            return VerificationFailed.exit_code
        return 0
    # The card push generates is uploaded from memory (and written locally once the commit lands).
    names = [rel if (plan.folder / rel).exists() else f"{rel} (to be generated)" for rel, _ in plan.files]
    width = max(len(name) for name in names)
    head = "would upload" if args.dry_run else "uploaded"
    print(f"{head} {len(plan.files)} files ({_human(plan.total_bytes)}) to {result.repo_id}@{result.revision}:")
    for name, (_, size) in zip(names, plan.files):
        print(f"  {name:<{width}}  {_human(size):>9}")
    for rel, why in plan.skipped:
        print(f"  skipped {rel}: {why}")
    if s.force and not (Path(args.dir) / "verification.json").is_file():
        print("warning: pushed with --force and no verification.json")
    for rel in result.deleted:
        print(f"  deleted {rel} (left by an earlier push)")
    if result.commit_url:
        print(f"commit: {result.commit_url}")
    if result.refusal:
        print(f"gqa-convert: error: a real push would be refused: {result.refusal}", file=sys.stderr)
        return VerificationFailed.exit_code
    return 0

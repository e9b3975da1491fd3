"""`gqa-convert card MODEL_DIR`: (re)write the model card from the folder's records."""

from __future__ import annotations

from pathlib import Path

from ..settings import CardSettings
from .flags import add_flags, settings_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "card",
        help="write MODEL_DIR/README.md, the model card, from the folder's records",
        description="Render the model card from gqa_convert.json, uptrain.json and verification.json: "
        "every number in it is measured. verify writes it too; use this to change the metadata.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="converted model folder")
    add_flags(p, CardSettings)
    p.add_argument("--repo", metavar="USER/NAME", help="the hub repo the card's usage snippet names")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..card import write_model_card
    from ..errors import CheckpointError

    s = settings_from_args(CardSettings, args)
    folder = Path(args.model)
    if (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
        # a card of measured numbers for a folder with nothing to load (it wrote one, exit 0)
        raise CheckpointError(f"{folder} has no safetensors weights: pass a converted model folder")
    path = write_model_card(args.model, base_model=s.base_model, repo_id=args.repo, title=s.title, license=s.license)
    print(f"wrote {path}")
    return 0

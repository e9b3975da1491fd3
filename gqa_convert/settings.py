"""Every setting of every stage, in one place: one pydantic model per stage.

Each model is at once
- the library's config object (`uptrain(UptrainConfig(...))`, `ConvertSettings(...)`),
- a section of the recipe YAML (`uptrain:`, `convert:`, ... under `RunSettings`), and
- the source of that command's CLI flags (`gqa_convert.commands.flags` generates them from the
  fields: `--name-with-dashes`, type, default, help, choices),
so a flag and its recipe key share one name, one default and one validation. Values are checked
when the recipe or command line is read, before any work: positivity, ranges, choices, and the
cross-field rules that need no weights.

This module imports no torch (the CLI's `--help` reads it).
"""

from __future__ import annotations

import difflib
import re
import reprlib
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .units import parse_count, parse_size

# --------------------------------------------------------------------------- shared defaults
# One home for each default that more than one stage (or the docs) relies on.

HELDOUT_DOCS = 200  # the first documents of a data source, never trained on, scored by verify
DEFAULT_TOLERANCE = 0.05  # nats/token above the law's prediction that verify allows (docs/verify.md)
DEFAULT_MAX_LOSS_INCREASE = 0.05  # largest predicted loss increase `plan` may recommend (nats)
MAX_CONTEXT = 1 << 24  # 16M tokens: above every published model's context (Llama 4 Scout's 10M)
DEFAULT_CALIB_TOKENS = 65536  # calibration tokens of the align/optimal merges (docs/merging.md)
REPO_ID_PATTERN = r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*"


def is_repo_id(value: str) -> bool:
    """`user/name` or `org/name` as the hub accepts it (the one repo-id check of the package)."""
    return bool(re.fullmatch(REPO_ID_PATTERN, value)) and ".." not in value and not value.endswith(".git")


# --------------------------------------------------------------------------- value types
# Each parses what a person types (`128K`, `50M`, `auto`) and refuses 0, negatives and garbage
# with a message that starts with "must", so the error reads "--context must be ...".


def _counter(what: str, binary_k: bool):
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"must be a positive whole number like {what}")
        try:
            return parse_count(value, what="value", binary_k=binary_k)
        except ConfigError:
            raise ValueError(f"must be a positive whole number like {what}") from None

    return parse


def _context(value: Any) -> int:
    n = _counter("8K, 128K or 131072", binary_k=True)(value)
    if n < 2:
        raise ValueError("must be at least 2 tokens")
    if n > MAX_CONTEXT:  # 1e9 or 1T is a typo, not a context: nothing could plan, train or score it
        raise ValueError(f"must be at most {MAX_CONTEXT // 1024 // 1024}M tokens ({MAX_CONTEXT})")
    return n


def _byte_size(value: Any) -> str:
    try:
        parse_size(value)
    except ConfigError:
        raise ValueError("must be a size like 5GB, 500MB or 2GiB") from None
    return str(value)


def _kv_heads(value: Any) -> Union[int, str]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, str))
        or not re.fullmatch(r"\s*\d+\s*", str(value))
        or int(value) < 1
    ):
        raise ValueError("must be a whole number or 'auto'")
    if int(value) > 1 << 16:  # no model has more heads; a 400-digit count would be quoted in every error
        raise ValueError("must be at most 65536 (or 'auto')")
    return int(value)


def _repo_id(value: Any) -> str:
    if not isinstance(value, str) or not is_repo_id(value):
        raise ValueError("must be a hub repo id like 'user/name'")
    return value


def _licence_id(value: Any) -> str:
    # The hub's licence ids (apache-2.0, llama3.1, cc-by-nc-4.0, other): a 10 KB or multi-line
    # value went into the card's YAML metadata as given.
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", value):
        raise ValueError("must be a licence id like apache-2.0, mit or other")
    return value


def _card_title(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200 or any(c in value for c in "\r\n"):
        raise ValueError("must be one line of at most 200 characters")
    return value


# K = 1024 for contexts (128K = 131072, as every long-context paper counts); K = 1000 for tokens.
ContextLength = Annotated[int, BeforeValidator(_context)]
TokenCount = Annotated[int, BeforeValidator(_counter("50M, 2B or 1e9", binary_k=False))]
ByteSize = Annotated[str, BeforeValidator(_byte_size)]
KvHeads = Annotated[Union[int, Literal["auto"]], BeforeValidator(_kv_heads)]
QHeads = Annotated[Union[int, Literal["auto"]], BeforeValidator(_kv_heads)]  # "auto": with kv_heads auto
RepoId = Annotated[str, BeforeValidator(_repo_id)]
LicenceId = Annotated[str, BeforeValidator(_licence_id)]
CardTitle = Annotated[str, BeforeValidator(_card_title)]
Fraction = Annotated[float, Field(ge=0, le=1)]


# --------------------------------------------------------------------------- one-line errors
MAX_SHOWN = 80  # characters of a bad value quoted in an error

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, MAX_SHOWN, MAX_SHOWN


def _shown(value: Any) -> str:
    # reprlib, not repr: a YAML alias bomb is tiny as a file and astronomically long as text.
    text = _REPR.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _section_of(model: type[BaseModel], loc: list[str]) -> type[BaseModel]:
    section: Any = model
    for part in loc:
        f = section.model_fields.get(part)
        ann = getattr(f, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            break
        section = inner[0]
    return section


def describe_error(error: Any, model: type[BaseModel], name: Callable[[list[str]], str]) -> str:
    """One line for a pydantic error: the key (as `name` spells it: dotted path or flag), what is
    wrong, and what is allowed. Values are quoted at most MAX_SHOWN characters long."""
    loc = [str(p) for p in error["loc"] if not isinstance(p, int)]
    key = name(loc) if loc else None
    msg = str(error.get("msg", "")).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        # Bounded both ways: the key is the user's (any length); a section such as uptrain has
        # 40 keys, so the closest matches are named first and the list is cut.
        fields = list(_section_of(model, loc[:-1]).model_fields)
        close = difflib.get_close_matches(loc[-1][:MAX_SHOWN], fields, n=3)
        allowed = ", ".join(close + [f for f in fields if f not in close])
        if len(allowed) > 120:
            allowed = allowed[:120].rsplit(", ", 1)[0] + ", ..."
        shown = repr(key) if len(repr(key)) <= 40 else repr(key)[:37] + "..."
        return f"unknown key {shown}; allowed here: {allowed}"
    if error["type"] == "missing":
        return f"missing required key {key!r}"
    if key is None or error["type"] == "value_error" and not msg.startswith("must"):
        return f"{key + ': ' if key else ''}{msg}"  # a cross-field rule: its message names the keys
    if msg.startswith("must"):
        return f"{key} {msg}, not {_shown(error.get('input'))}"
    if error["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be")
    return f"invalid value for {key!r}: {msg} (got {_shown(error.get('input'))})"


def validate_settings(
    model: type[BaseModel], data: Any, *, where: str = "", name: Callable[[list[str]], str] = ".".join
):
    """model.model_validate(data), every failure a ConfigError of one line."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(where + describe_error(err.errors()[0], model, name)) from None
    except RecursionError:
        raise ConfigError(where + "settings are nested too deeply") from None


def _flag_of(loc: list[str]) -> str:
    return flag_name(loc[-1])


class Settings(BaseModel):
    """Base of every settings model: unknown keys are errors, assignments are validated."""

    # inf/nan are never a setting (an `--lr inf` run trains to NaN weights and exits 0).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class CommandConfig(Settings):
    """A whole command's config built by a library caller (`UptrainConfig(...)`): a bad value is
    a ConfigError of one line naming the flag (`--lr must be ...`), as on the command line.
    (Not for recipe sections: pydantic calls a custom __init__ for nested models too.)"""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(describe_error(err.errors()[0], type(self), _flag_of)) from None


def field(
    default: Any = None,
    help: str = "",
    *,
    short: Optional[str] = None,
    metavar: Optional[str] = None,
    aliases: tuple[str, ...] = (),
    **constraints: Any,
) -> Any:
    """A settings field: its default, its help line (shown by --help and in the docs), and for
    the generated flag a short spelling (`-o`) and a metavar where the defaults do not fit."""
    extra: dict[str, Any] = {k: v for k, v in (("short", short), ("metavar", metavar)) if v}
    if aliases:
        extra["aliases"] = list(aliases)
    return Field(default=default, description=help, json_schema_extra=extra or None, **constraints)


def flag_name(name: str) -> str:
    """The CLI spelling of a settings field: `heldout_docs` -> `--heldout-docs`."""
    return "--" + name.replace("_", "-")


def command_line(
    command: str, settings: BaseModel, *, positional: tuple[str, ...] = (), skip: tuple[str, ...] = ()
) -> str:
    """`gqa-convert COMMAND ...` that reproduces `settings`: positionals, then every field that
    differs from its default (the card's "how to reproduce" and the records use it)."""
    import shlex

    parts = ["gqa-convert", command] + [str(getattr(settings, p)) for p in positional]
    for name, info in type(settings).model_fields.items():
        if name in positional or name in skip:
            continue
        value = getattr(settings, name)
        required = info.is_required()
        if not required and value == info.get_default(call_default_factory=True):
            continue
        if isinstance(value, bool):
            parts.append(flag_name(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (tuple, list)):
            parts += [flag_name(name), *map(str, value)]
        elif value is not None:
            parts += [flag_name(name), str(value)]
    return " ".join(shlex.quote(p) for p in parts)


# --------------------------------------------------------------------------- data sources


class TextFormat(Settings):
    """How to read documents out of a source (JSONL/Parquet field, HF dataset split and config)."""

    text_field: str = field("text", "JSONL/Parquet/dataset field that holds the text", min_length=1)
    data_split: str = field("train", "HF dataset split", min_length=1)
    data_config: Optional[str] = field(None, "HF dataset configuration name")


class HeldOut(Settings):
    heldout_docs: int = field(
        HELDOUT_DOCS, "first N documents held out: never trained or calibrated on, scored by verify", ge=0
    )


class TrainSlice(HeldOut):
    train_start: Optional[int] = field(None, "first training document (default: right after the held-out ones)", ge=0)

    @model_validator(mode="after")
    def _start_after_heldout(self):
        if self.train_start is not None and self.train_start < self.heldout_docs:
            raise ValueError(f"train_start {self.train_start} lies inside the {self.heldout_docs} held-out documents")
        return self


def data_spec(source: str, fmt: TextFormat, heldout: int, train_start: Optional[int] = None):
    """The one constructor of a document source from settings (train.data.DataSpec)."""
    from .train.data import DataSpec

    return DataSpec(source, fmt.text_field, fmt.data_split, fmt.data_config, heldout, train_start)


# --------------------------------------------------------------------------- stages


class ConvertSettings(TextFormat, TrainSlice):
    """`gqa-convert convert` and the recipe's `convert:` section."""

    method: Literal["auto", "mean", "align", "optimal"] = field(
        "auto", "KV-head merge; auto = optimal when calibration text is at hand, else mean (docs/merging.md)"
    )
    q_method: Literal["merge", "prune"] = field(
        "merge",
        "query-head reduction for --q-heads: merge (refit o_proj by least squares) or prune (docs/query-heads.md)",
    )
    calib_data: Optional[str] = field(
        None,
        "calibration text for align/optimal: file, folder or HF dataset name "
        "(in a run: default the uptraining documents after the held-out ones)",
    )
    calib_tokens: TokenCount = field(DEFAULT_CALIB_TOKENS, "calibration tokens of the calibrated merges")
    calib_device: str = field(
        "auto", "where calibration runs: auto (cuda when there is one, else cpu), cpu, cuda", min_length=1
    )
    max_shard_size: ByteSize = field("5GB", "largest output shard")
    allow_pickle: bool = field(False, "read pickle .bin weights (loaded with weights_only)")


class UptrainSettings(TextFormat, TrainSlice):
    """The recipe's `uptrain:` section: how to uptrain, whatever the model and output folder."""

    data: Optional[str] = field(None, ".txt/.jsonl/.parquet file, a folder of them, or a HF dataset name")
    tokens: Optional[TokenCount] = field(None, "budget in training tokens, e.g. 50M")
    steps: Optional[int] = field(None, "budget in optimizer steps", gt=0)
    alpha: Optional[float] = field(
        None, "budget as a fraction of the source's pretraining tokens, e.g. 0.05", gt=0, le=1
    )
    pretraining_tokens: Optional[TokenCount] = field(None, "the source's pretraining tokens for --alpha, e.g. 2T")
    lr: Optional[float] = field(
        None,
        "maximum learning rate (default: by the model's width, 0.32 / hidden_size clamped to [1e-5, 5e-3]: "
        "5e-3 at 64, 7.8e-5 at 4096; docs/uptrain.md, Defaults)",
        gt=0,
        le=1,  # AdamW above 1 only diverges (1e308 overflows torch's float)
    )
    lr_floor: Fraction = field(0.1, "the decay ends at this fraction of --lr")
    batch_size: int = field(8, "sequences per process per micro-step", gt=0)
    grad_accum: int = field(1, "micro-steps per optimizer step", gt=0)
    warmup: float = field(0.05, "WSD warmup fraction of the steps", ge=0, lt=1)
    decay: Fraction = field(0.5, "WSD cosine-decay fraction of the steps")
    weight_decay: float = field(0.1, "AdamW weight decay", ge=0)
    betas: tuple[float, float] = field((0.9, 0.95), "AdamW betas")
    clip: float = field(1.0, "gradient-norm clipping", gt=0)
    train: Literal["all", "attention", "kv"] = field(
        "attention", "what trains: attention (q/k/v/o of every layer), all, or kv (the regrouped k/v projections)"
    )
    distill: bool = field(
        True,
        "distil from the unconverted model: --distill-from, else the source recorded in the model's "
        "gqa_convert.json when it is found (in a run: the run's source); --no-distill: next-token loss only",
    )
    distill_from: Optional[str] = field(
        None,
        "unconverted model to distil from (default: the recorded source; in a run: the run's source)",
        metavar="SRC",
    )
    distill_weight: Fraction = field(1.0, "weight w of KL(teacher||student) in the loss (1-w)*CE + w*KL")
    lora: bool = field(False, "train LoRA adapters (peft), merged back on save")
    lora_rank: int = field(16, "LoRA rank", gt=0)
    attn: Literal["auto", "flash", "sdpa", "packed"] = field(
        "auto",
        "attention kernel: auto (flash-attn 2 when it can run, else packed), flash, packed (one causal "
        "SDPA call per packed document, no [T, T] mask), sdpa (stock, with the [T, T] document mask)",
    )
    gradient_checkpointing: Optional[bool] = field(None, "recompute activations in backward (default: on with CUDA)")
    sequence_parallel: int = field(
        1,
        "sequence-parallel degree: DeepSpeed Ulysses splits every row's tokens over this many processes "
        "(launch with torchrun; the [sp] extra; docs/parallel.md)",
        gt=0,
    )
    loss_chunk_tokens: Optional[int] = field(
        None,
        "tokens per chunk of the output head in the loss (default: "
        "about 32M logits, e.g. 256 tokens at a 128K vocabulary)",
        gt=0,
    )
    loss_impl: Literal["chunked", "liger", "auto"] = field(
        "chunked",
        "loss kernel: chunked (PyTorch, everywhere), liger (liger-kernel's fused linear "
        "cross-entropy, CUDA, no distillation), auto (liger where it applies)",
    )
    save_every: int = field(50, "steps between checkpoints", gt=0)
    seed: int = field(0, "random seed", ge=0, lt=2**63)
    shuffle: bool = field(
        True,
        "shuffle the training documents with --seed, anew each epoch (a shuffle buffer, resumable); "
        "--no-shuffle keeps the source's order",
    )
    shuffle_buffer: int = field(
        10_000,
        "documents in the shuffle buffer: a source of at most this many documents is fully shuffled, "
        "a larger one mixed within a window of about this many",
        gt=0,
    )
    eval_every: Optional[int] = field(
        None, "steps between held-out evaluations (default: 5 evenly spaced, the last at the final step)", gt=0
    )
    eval_docs: int = field(
        50, "held-out documents scored at each evaluation: the first N of heldout.jsonl (0: no evaluation)", ge=0
    )
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = field(
        "none",
        "also log the metrics to a tracker through accelerate (extras [tensorboard], [wandb], [trackio]; "
        "wandb runs offline unless WANDB_MODE is set)",
    )

    @model_validator(mode="after")
    def _schedule(self):
        if self.warmup + self.decay > 1:
            raise ValueError(f"warmup {self.warmup} + decay {self.decay} must not exceed 1")
        return self

    def budgets(self) -> list[str]:
        return [name for name in ("tokens", "steps", "alpha") if getattr(self, name) is not None]

    def check_budget(self) -> None:
        """Exactly one of tokens / steps / alpha (checked where a run needs one)."""
        if len(self.budgets()) != 1:
            raise ConfigError(
                "uptrain needs exactly one budget: tokens (e.g. 50M), steps or alpha "
                f"(given: {', '.join(self.budgets()) or 'none'})"
            )


class UptrainConfig(UptrainSettings, CommandConfig):
    """One `gqa-convert uptrain` run: the settings plus what a recipe gets from its other stages
    (the model from convert, the output folder from run_dir, the context from the top level)."""

    model: str = field(..., "converted model folder (or hub id)", metavar="MODEL_DIR")
    data: str = field(..., ".txt/.jsonl/.parquet file, a folder of them, or a HF dataset name")  # type: ignore[assignment]
    context: ContextLength = field(..., "tokens per packed sequence, e.g. 8K")
    output: str = field(..., "run folder: final model, metrics, checkpoints")
    resume: bool = field(False, "continue the run in --output from its last checkpoint")
    progress: bool = field(True, "show a progress bar")

    @model_validator(mode="after")
    def _one_budget(self):
        self.check_budget()
        return self


class VerifySettings(TextFormat):
    """`gqa-convert verify` and the recipe's `verify:` section."""

    data: Optional[str] = field(
        None, "held-out text: file, folder or HF dataset name (in a run: default uptrain.data and its format)"
    )
    heldout_docs: int = field(
        HELDOUT_DOCS, "score the first N documents (the held-out slice)", gt=0, aliases=("--documents",)
    )
    tolerance: float = field(
        DEFAULT_TOLERANCE, "nats/token allowed above the law's prediction", ge=0, allow_inf_nan=False
    )
    batch_size: int = field(8, "documents per forward pass (1 at long context: no padding, no [T, T] mask)", gt=0)
    device: str = field(
        "auto", "torch device: auto (cuda when there is one, else cpu), cpu, cuda, cuda:1, ...", min_length=1
    )
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        "auto", "weights while measuring: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16"
    )
    loss_chunk_tokens: Optional[int] = field(
        None, "tokens per chunk of the output head (default: about 32M logits)", gt=0
    )
    progress: bool = field(True, "show progress bars")
    dataset_id: Optional[str] = field(None, "hub dataset id of the text, for the card's metadata")
    retrieval: bool = field(True, "also measure long-context retrieval (the eval: settings) for source and converted")
    min_retrieval_ratio: Optional[float] = field(
        None,
        "fail when converted / source retrieval accuracy is below this (e.g. 0.9); default: report only",
        ge=0,
        le=1,
    )


def _comma_list(value: Any) -> Any:
    """`4K,8K,16K` (one flag value, as people type it) or a YAML list."""
    if isinstance(value, str):
        return [v for v in (p.strip() for p in value.split(",")) if v]
    return value


# At least one item: an empty `--tasks ''` / `--depths ''` silently ran the defaults.
Lengths = Annotated[list[ContextLength], BeforeValidator(_comma_list), Field(min_length=1)]
Names = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=64)]], BeforeValidator(_comma_list), Field(min_length=1)
]
Depths = Annotated[list[Annotated[float, Field(ge=0, le=1)]], BeforeValidator(_comma_list), Field(min_length=1)]
RETRIEVAL_TASKS = (
    "passkey",
    "ruler",
    "niah_single_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "ruler_vt",
    "ruler_cwe",
    "ruler_fwe",
)  # "ruler": every offline RULER task (docs/eval.md)


class EvalSettings(Settings):
    """`gqa-convert eval` and the recipe's `eval:` section: long-context retrieval (docs/eval.md)."""

    tasks: Names = field(
        ["passkey", "ruler"],
        "comma-separated: passkey (built in), ruler (every offline "
        "RULER task; needs the [eval] extra, skipped without it) or RULER task names",
    )
    lengths: Optional[Lengths] = field(
        None, "comma-separated prompt lengths, e.g. 4K,8K,16K (default: T/8, T/4, T/2 and T)"
    )
    depths: Depths = field([0.0, 0.25, 0.5, 0.75, 1.0], "passkey depths, fractions of the prompt")
    samples: int = field(5, "passkey samples per length x depth", gt=0, le=1000)
    ruler_limit: int = field(20, "RULER samples per task x length", gt=0, le=1000)
    seed: int = field(0, "seed of the prompts (the same for source and converted)", ge=0, lt=2**63)
    batch_size: int = field(4, "prompts per forward pass", gt=0)
    device: Optional[str] = field(None, "torch device, e.g. cuda (default: cuda when there is one, else cpu)")
    progress: bool = field(True, "show a progress bar")

    @model_validator(mode="after")
    def _known_tasks(self):
        unknown = [t for t in self.tasks if t not in RETRIEVAL_TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0][:40]!r}; choose from {', '.join(RETRIEVAL_TASKS)}")
        return self

    def lengths_for(self, context: int) -> list[int]:
        if self.lengths:
            return sorted(set(self.lengths))
        return sorted({max(2, context // 8), max(2, context // 4), max(2, context // 2), context})


class HardwareSettings(Settings):
    """The recipe's `hardware:` section and `plan`'s flags: what uptraining will run on, for the
    memory and time planner (gqa_convert.memory; docs/long-context.md)."""

    gpus: int = field(1, "GPUs (processes) uptraining runs on", gt=0, le=65536)
    gpu_memory: Optional[ByteSize] = field(None, "memory of one GPU, e.g. 80GB (default: report only, no verdict)")
    sequence_parallel: int = field(
        1, "sequence-parallel degree (DeepSpeed Ulysses): the context split over this many GPUs", gt=0
    )
    sharding: Literal["none", "optimizer", "gradients", "full", "ddp", "zero1", "zero2", "zero3", "fsdp"] = field(
        "none",
        "what is sharded over the GPUs: none (DDP), optimizer (ZeRO-1), gradients (ZeRO-2), full (ZeRO-3 / FSDP)",
    )
    tokens_per_s: Optional[float] = field(
        None,
        "measured training tokens/s of the whole job, for the time estimate (e.g. from a short run's uptrain.json)",
        gt=0,
    )


class CardSettings(Settings):
    """The recipe's `card:` section: what the model card says beyond the measured numbers."""

    title: Optional[CardTitle] = field(None, "card title (default: the hub repo's or the folder's name)")
    base_model: Optional[RepoId] = field(
        None, "hub id of the source for the card's base_model (default: the recorded source, if it is a hub id)"
    )
    license: Optional[LicenceId] = field(None, "licence id (default: the source's)")


class PushSettings(Settings):
    """`gqa-convert push` and the recipe's `push:` section (tokens are never settings: they would
    be written to recipe.yaml)."""

    repo: RepoId = field(..., "target repo, user/name or org/name", metavar="USER/NAME")
    private: bool = field(False, "create the repo private")
    revision: Optional[str] = field(None, "branch to commit to (created from main if missing)")
    force: bool = field(False, "push even if verification is missing or failed")
    message: Optional[str] = field(None, "commit message")


# --------------------------------------------------------------------------- the run


class RunSettings(Settings):
    """A whole run: the recipe. Top-level keys are shared by several stages; each stage has its section.

    source: meta-llama/Meta-Llama-3-8B   # hub id, alias, local folder or llama2.c .bin
    kv_heads: 2                          # or "auto" (the law's recommendation at `context`)
    context: 128K
    run_dir: runs/llama3-8b-kv2
    convert:  {method: optimal}
    uptrain:  {data: ..., tokens: 1B}    # omit (or enabled: false) to skip
    verify:   {tolerance: 0.05}
    push:     {repo: user/name}          # omit to keep the model local
    """

    source: str = field(
        ..., "hub id, alias (see `gqa-convert models`), local folder or llama2.c .bin", min_length=1, metavar="MODEL"
    )
    kv_heads: KvHeads = field(
        ..., "new KV-head count (must divide the old one), or 'auto' for the law's recommendation at --context"
    )
    q_heads: Optional[QHeads] = field(
        None,
        "new query-head count (default: unchanged): a multiple of the KV-head count that divides the old one, "
        "or auto with --kv-heads auto (the law's joint recommendation; docs/query-heads.md)",
    )
    context: ContextLength = field(..., "target context length, e.g. 8K, 128K, 131072")
    run_dir: str = field(..., "run folder", min_length=1)
    revision: Optional[str] = field(None, "hub branch, tag or commit of the source")
    max_loss_increase: float = field(
        DEFAULT_MAX_LOSS_INCREASE, "largest predicted loss increase (nats) a recommendation may have", gt=0
    )
    law: Optional[str] = field(None, "law file from `gqa-convert law fit` (default: the shipped coefficients)")
    convert: ConvertSettings = Field(default_factory=ConvertSettings)
    uptrain: "UptrainSection" = Field(default_factory=lambda: UptrainSection(enabled=False))
    verify: VerifySettings = Field(default_factory=VerifySettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    hardware: HardwareSettings = Field(default_factory=HardwareSettings)
    card: CardSettings = Field(default_factory=CardSettings)
    push: Optional[PushSettings] = None

    @model_validator(mode="after")
    def _cross_stage(self):
        if self.q_heads == "auto" and self.kv_heads != "auto":
            raise ValueError("q_heads auto needs kv_heads auto: the law recommends both counts together")
        up = self.uptrain
        if up.enabled:
            if up.data is None:
                raise ValueError("uptrain.data is required when uptrain is enabled (a file, folder or dataset name)")
            up.check_budget()
            if up.num_processes % up.sequence_parallel:  # before any stage runs, not at uptraining
                raise ValueError(
                    f"uptrain.sequence_parallel {up.sequence_parallel} does not divide uptrain.num_processes "
                    f"{up.num_processes}: the processes form groups of {up.sequence_parallel}; set "
                    f"uptrain.num_processes to a multiple of it"
                )
            same_text = self.verify.data in (None, up.data)
            if same_text and self.verify.heldout_docs > up.heldout_docs:
                raise ValueError(
                    f"verify.heldout_docs ({self.verify.heldout_docs}) exceeds uptrain.heldout_docs "
                    f"({up.heldout_docs}): verification would score documents the model was trained on"
                )
        return self

    # What each stage reads, resolved in one place.
    def verify_source(self) -> Optional[tuple[str, TextFormat]]:
        """The text verify scores and its format: verify.data, else the uptraining data."""
        if self.verify.data:
            return self.verify.data, self.verify
        if self.uptrain.enabled and self.uptrain.data:
            return self.uptrain.data, self.uptrain
        return None

    def calibration_spec(self):
        """convert.calib_data after its held-out slice, else the uptraining documents after the
        slices that uptraining and verification hold out, else None (then `auto` means mean)."""
        c = self.convert
        if c.calib_data:
            return data_spec(c.calib_data, c, c.heldout_docs, c.train_start)
        if self.uptrain.enabled and self.uptrain.data:
            up = self.uptrain
            held = max(up.heldout_docs, self.verify.heldout_docs)
            return data_spec(up.data, up, held, max(up.train_start or 0, held))
        return None


class UptrainSection(UptrainSettings):
    """`uptrain:` in a recipe: the settings plus a switch (the pipeline's `--data` turns it on)."""

    enabled: bool = field(True, "run the uptraining stage")
    num_processes: int = field(
        1,
        "processes (one per GPU) the pipeline launches the uptraining stage on; with more than 1 it runs "
        "`gqa-convert uptrain` under the launcher and continues with verify/card/push itself",
        gt=0,
    )
    launcher: Literal["torchrun", "accelerate"] = field(
        "torchrun", "how the pipeline launches a multi-process uptraining stage"
    )


RunSettings.model_rebuild()


def pick(model: type[Settings], names: tuple[str, ...], *, optional: tuple[str, ...] = ()) -> type[Settings]:
    """A model of some of `model`'s fields, the same definitions (type, default, help, checks):
    how a single command takes top-level recipe keys (`convert` takes kv_heads, context, ...).
    Fields in `optional` default to None there."""
    import copy

    from pydantic import create_model

    fields: dict[str, Any] = {}
    for name in names:
        info = model.model_fields[name]
        if name in optional:
            info = copy.copy(info)
            info.default = None
            fields[name] = (Optional[info.annotation], info)  # type: ignore[valid-type]
        else:
            fields[name] = (info.annotation, info)
    return create_model(f"{model.__name__}_{'_'.join(names)}", __base__=Settings, **fields)


# The stage sections of a recipe, in run order, and the model of each.
SECTIONS: dict[str, type[Settings]] = {
    "convert": ConvertSettings,
    "uptrain": UptrainSection,
    "verify": VerifySettings,
    "eval": EvalSettings,
    "hardware": HardwareSettings,
    "card": CardSettings,
    "push": PushSettings,
}

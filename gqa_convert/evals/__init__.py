"""Long-context retrieval evals of a loaded model (docs/eval.md).

- `passkey_probe`: the built-in passkey retrieval probe, accuracy by length x depth; needs
  nothing beyond the base install. `plot_passkey_heatmap` draws it.
- `ruler_scores`: RULER's offline tasks through lm-evaluation-harness (the `[eval]` extra);
  imported lazily, so this package loads without lm-eval.
"""

from __future__ import annotations

from .heatmap import plot_passkey_heatmap
from .passkey import (
    DEFAULT_DEPTHS,
    PasskeyCell,
    PasskeyPrompt,
    PasskeyResult,
    PasskeySample,
    answer_budget,
    build_passkey_prompts,
    minimum_length,
    passkey_probe,
)
from .ruler import (
    LEFT_OUT,
    OFFLINE_TASKS,
    EvalExtraMissing,
    RulerResult,
    RulerSample,
    RulerScore,
    ruler_scores,
)

__all__ = [
    "DEFAULT_DEPTHS",
    "PasskeyCell",
    "PasskeyPrompt",
    "PasskeyResult",
    "PasskeySample",
    "answer_budget",
    "build_passkey_prompts",
    "minimum_length",
    "passkey_probe",
    "plot_passkey_heatmap",
    "LEFT_OUT",
    "OFFLINE_TASKS",
    "EvalExtraMissing",
    "RulerResult",
    "RulerSample",
    "RulerScore",
    "ruler_scores",
]

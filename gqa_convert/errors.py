"""Errors a user can act on. Each message is one line: what was wrong, and what would be right.

The CLI prints `gqa-convert: error: <message>` and exits with `exit_code`; library callers catch
the specific class.
"""


class GqaConvertError(Exception):
    """Base class: a problem with the user's input or environment, reported in one line."""

    exit_code = 2


class SourceNotFoundError(GqaConvertError):
    """A model id, alias or folder that does not resolve to a checkpoint."""


class AccessError(GqaConvertError):
    """A private or gated repository without a token that grants access."""


class UnsupportedModelError(GqaConvertError):
    """A model family whose transformers class cannot hold fewer KV heads, or is unknown."""


class InvalidHeadCountError(GqaConvertError):
    """A KV/query head count that does not divide the model's heads."""


class CheckpointError(GqaConvertError):
    """A missing, truncated or unreadable checkpoint file, or pickle weights not allowed."""


class OutputError(GqaConvertError):
    """An output path that exists, equals the source, or cannot be written."""


class ConfigError(GqaConvertError):
    """An invalid recipe, law file, runs file or command-line value."""


class DataError(GqaConvertError):
    """Training/evaluation data that is empty, unreadable or too short."""


class VerificationFailed(GqaConvertError):
    """Measured loss or cost disagrees with the law's prediction."""

    exit_code = 1


class HubError(GqaConvertError):
    """The hub (or a hub-compatible server) is unreachable or refused a request."""


class LawError(ConfigError):
    """A target the scaling law cannot reach (loss at or below E) or a head configuration it lacks."""

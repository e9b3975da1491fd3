"""Hub failures as one line that says what to do: the package's one translation of
huggingface_hub / HTTP errors, for reading a model (`download_error`) and for writing one
(`hub_error`). Tokens never appear in a message."""

from __future__ import annotations

import json
import os
from typing import Optional

from .errors import AccessError, GqaConvertError, HubError, SourceNotFoundError


def _status(err: Exception) -> Optional[int]:
    return getattr(getattr(err, "response", None), "status_code", None)


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def download_error(err: Exception, repo: str, revision: Optional[str]) -> GqaConvertError:
    """A one-line error for a failure while fetching `repo` (convert, plan, verify sources)."""
    from huggingface_hub import errors as hf

    where = f"{repo}" + (f"@{revision}" if revision else "")
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(err, GqaConvertError):
        return err
    if isinstance(err, hf.GatedRepoError):
        return AccessError(f"{repo} is gated: accept its licence on its hub page, then {login}")
    if isinstance(err, hf.RepositoryNotFoundError):
        return SourceNotFoundError(
            f"hub repo {repo} does not exist or is private: check the id (or run `gqa-convert models` for "
            f"aliases); for a private repo {login}"
        )
    if isinstance(err, hf.RevisionNotFoundError):
        return SourceNotFoundError(f"revision {revision!r} not found in {repo}: check the branch, tag or commit")
    if isinstance(err, hf.LocalEntryNotFoundError):
        return HubError(
            f"cannot reach the hub at {_endpoint()} and {where} is not in the local hub cache; check the "
            "connection and HF_ENDPOINT (or unset HF_HUB_OFFLINE), or pass a local folder"
        )
    if isinstance(err, hf.HfHubHTTPError):
        status = _status(err)
        if status in (401, 403):
            return AccessError(f"the hub refused access to {repo} (HTTP {status}): {login} to a token that can read it")
        return HubError(f"the hub failed while fetching {where} (HTTP {status}); try again later")
    return HubError(
        f"cannot reach the hub for {where} ({type(err).__name__}); check the connection or HF_ENDPOINT, "
        "or pass a local folder"
    )


def _first_line(err: Exception) -> str:
    """The hub's own message, one line: the JSON `error` field when the body is JSON."""
    text = str(err).strip()
    try:
        text = str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        pass
    return (text.splitlines() or [type(err).__name__])[0][:300]


def hub_error(err: Exception, repo_id: str, action: str) -> GqaConvertError:
    """A one-line project error for a huggingface_hub / HTTP failure while doing `action` on `repo_id`."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    if isinstance(err, GqaConvertError):
        return err
    status = _status(err)
    login = "log in with `hf auth login`, set HF_TOKEN or pass --token"
    if isinstance(err, hf.GatedRepoError):
        return AccessError(f"{repo_id} is gated: accept its terms on the hub, then {login}")
    if isinstance(err, hf.RepositoryNotFoundError):
        if status == 401:
            return AccessError(f"{repo_id} is private or does not exist and no valid token was sent: {login}")
        return SourceNotFoundError(f"hub repo {repo_id} does not exist (or your token cannot see it): check the id")
    if isinstance(err, hf.RevisionNotFoundError):
        return SourceNotFoundError(f"that revision does not exist in {repo_id}: check the branch, tag or commit")
    if isinstance(err, hf.HfHubHTTPError) and status is not None:
        if status in (401, 403):
            return AccessError(
                f"the hub refused to {action} {repo_id} (HTTP {status}): use a token with write access to it; {login}"
            )
        if status >= 500:
            return HubError(
                f"the hub failed to {action} {repo_id} (HTTP {status}); nothing was committed, re-run the command"
            )
        return HubError(f"the hub refused to {action} {repo_id} (HTTP {status}: {str(err).splitlines()[0][:200]})")
    if isinstance(err, hf.OfflineModeIsEnabled):
        return HubError(f"cannot {action} {repo_id}: HF_HUB_OFFLINE is set; unset it to reach the hub")
    return HubError(
        f"cannot reach the hub at {constants.ENDPOINT} to {action} {repo_id} ({type(err).__name__}); "
        "check the connection or HF_ENDPOINT, then re-run (nothing was committed)"
    )

"""What a user is told when a base cannot be had from the Hugging Face hub: not downloaded and no network, a gated
repo without a login, or no such repo. diffusers and transformers raise these as tracebacks several errors deep
(an ``OSError`` whose cause is the hub's error); :func:`base_unavailable` finds the hub's error in the chain and
turns it into one :class:`BaseUnavailableError` that names the repo and what to do."""

from __future__ import annotations

import os

from .registry import ModelSpec

#: where each front end takes the base
BASE_OPTION = "the base (CLI: --base; Load node: base; library: base=)"


class BaseUnavailableError(ValueError):
    """The base is a hub repo that cannot be loaded here; the message says why and what to do."""


def is_hub_repo_id(source: str) -> bool:
    """Whether ``source`` is a hub repo id (``owner/name``) rather than a local file or folder."""
    return source.count("/") == 1 and not os.path.exists(source) and not source.startswith((".", "/", "~"))


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def base_unavailable(spec: ModelSpec, repo: str, error: BaseException) -> BaseUnavailableError | None:
    """The error to raise instead of ``error`` when loading ``spec``'s base ``repo`` failed at the hub, or None when
    the failure was something else (which then propagates as it is)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    login = "`huggingface-cli login` (or set HF_TOKEN)"
    download = (f"download it once where there is a network: `huggingface-cli download {repo}` (gated repos need "
                f"{login} first), or give a local diffusers folder of it as {BASE_OPTION}")
    for cause in _causes(error):
        if isinstance(cause, GatedRepoError):
            return BaseUnavailableError(
                f"{spec.model_id}: {repo} is a gated repo and this machine is not allowed to download it: accept its "
                f"licence at https://huggingface.co/{repo} with your account, log in here once with {login}, then "
                "run again.")
        if isinstance(cause, RepositoryNotFoundError):
            return BaseUnavailableError(
                f"{spec.model_id}: the hub has no repo {repo!r} that this machine can see (a typo, or a private repo: "
                f"log in with {login}). Give a hub repo id (default {spec.base!r}) or a local diffusers folder as "
                f"{BASE_OPTION}.")
        if isinstance(cause, HfHubHTTPError) and cause.response is not None and cause.response.status_code in (401, 403):
            return BaseUnavailableError(
                f"{spec.model_id}: the hub refused to serve {repo} (HTTP {cause.response.status_code}): if it is gated "
                f"or private, accept its licence at https://huggingface.co/{repo} and log in here with {login}.")
        if isinstance(cause, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError)) or (
                type(cause).__name__ in ("ConnectError", "ConnectTimeout", "NetworkError")):
            offline = " (HF_HUB_OFFLINE is set)" if isinstance(cause, OfflineModeIsEnabled) else ""
            return BaseUnavailableError(
                f"{spec.model_id}: {repo} is not (fully) downloaded in the Hugging Face cache ({_hub_cache()}) and "
                f"the hub cannot be reached{offline}. To run it, {download}.")
    return None

"""What a user is told when a base cannot be had from the Hugging Face hub: not downloaded and no network, a gated
repo without a login, or no such repo. diffusers and transformers raise these as tracebacks several errors deep
(an ``OSError`` whose cause is the hub's error); :func:`base_unavailable` finds the hub's error in the chain and
turns it into one :class:`BaseUnavailableError` that names the repo and what to do."""

from __future__ import annotations

import os
import re

from .registry import ModelSpec

#: where each front end takes the base
BASE_OPTION = "the base (CLI: --base; Load node: base; library: base=)"


class BaseUnavailableError(ValueError):
    """A hub repo the pipeline loads (its base, or one a family loads beside it) cannot be had here; the message says
    why and what to do."""


def is_hub_repo_id(source: str) -> bool:
    """Whether ``source`` is a hub repo id (``owner/name``) rather than a local file or folder."""
    return source.count("/") == 1 and not os.path.exists(source) and not source.startswith((".", "/", "~"))


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def hub_cache() -> str:
    """The Hugging Face cache that downloads go to and loads read: huggingface_hub's own setting (``HF_HUB_CACHE``,
    else ``HF_HOME/hub``, as the environment was when it was imported)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """Whether huggingface_hub is set never to reach the hub (``HF_HUB_OFFLINE``, read when it was imported)."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def repo_cache_folder(cache: str, repo: str) -> str:
    """The folder of model repo ``repo`` in the hub cache ``cache`` (its snapshots are below it once downloaded)."""
    return os.path.join(cache, "models--" + repo.replace("/", "--"))


def _in_hub_cache(repo: str) -> bool:
    return os.path.isdir(os.path.join(repo_cache_folder(hub_cache(), repo), "snapshots"))


# the repo in a hub address of an error message (https://huggingface.co/api/models/owner/name, .../owner/name/resolve/)
_REPO_IN_ADDRESS = re.compile(r"huggingface\.co/(?:api/models/)?(?!(?:docs|api|settings|login|join|spaces|datasets)/)"
                              r"([\w.-]+/[\w.-]*\w)")


def failed_repo(error: BaseException, source: str) -> str | None:
    """The hub repo a load failed on: the one the hub's error names, else the one in its address, else ``source``
    when it is a hub repo id missing from the cache, else None (a family may load a second repo, a separate text
    encoder or tokenizer, and transformers' offline errors name none)."""
    causes = list(_causes(error))
    named = next((cause.repo_id for cause in causes if getattr(cause, "repo_id", None)), None)
    in_address = next((match.group(1) for match in map(_REPO_IN_ADDRESS.search, map(str, causes)) if match), None)
    missing_base = source if is_hub_repo_id(source) and not _in_hub_cache(source) else None
    return named or in_address or missing_base


def base_unavailable(spec: ModelSpec, source: str, error: BaseException) -> BaseUnavailableError | None:
    """The error to raise instead of ``error`` when loading ``spec``'s pipeline from ``source`` failed at the hub
    (the base repo, or another repo the family loads beside it), or None when the failure was something else (which
    then propagates as it is)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    hub_error = next((cause for cause in _causes(error) if isinstance(cause, (
        HfHubHTTPError, OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError)) or type(cause).__name__ in (
        "ConnectError", "ConnectTimeout", "NetworkError")), None)
    if hub_error is None:
        return None
    repo = failed_repo(error, source)
    login = "`huggingface-cli login` (or set HF_TOKEN)"
    what = f"{repo} (a repo {spec.model_id} loads beside its base)" if repo and repo != source else repo
    if isinstance(hub_error, GatedRepoError):
        return BaseUnavailableError(
            f"{spec.model_id}: {what} is a gated repo and this machine is not allowed to download it: accept its "
            f"licence at https://huggingface.co/{repo} with your account, log in here once with {login}, then run "
            "again.")
    if isinstance(hub_error, RepositoryNotFoundError):
        return BaseUnavailableError(
            f"{spec.model_id}: the hub has no repo {repo!r} that this machine can see (a typo, or a private repo: log "
            f"in with {login}). Give a hub repo id (default {spec.base!r}) or a local diffusers folder as "
            f"{BASE_OPTION}.")
    if isinstance(hub_error, HfHubHTTPError) and hub_error.response is not None \
            and hub_error.response.status_code in (401, 403):
        return BaseUnavailableError(
            f"{spec.model_id}: the hub refused to serve {what or 'a file'} (HTTP {hub_error.response.status_code}): if "
            f"it is gated or private, accept its licence on its hub page and log in here with {login}.")
    if isinstance(hub_error, HfHubHTTPError):
        return None  # a server error or a missing revision: the hub's own message says more than we could
    offline = " (HF_HUB_OFFLINE is set)" if isinstance(hub_error, OfflineModeIsEnabled) else ""
    if repo is None:
        return BaseUnavailableError(
            f"{spec.model_id}: a file it loads from the Hugging Face hub beside its base (a separate text encoder or "
            f"tokenizer repo) is not in the cache ({hub_cache()}) and the hub cannot be reached{offline}. Run it once "
            f"where there is a network, so that the files are downloaded. ({str(error).splitlines()[0]})")
    instead = f", or give a local diffusers folder of it as {BASE_OPTION}" if repo == source else ""
    return BaseUnavailableError(
        f"{spec.model_id}: {what} is not (fully) downloaded in the Hugging Face cache ({hub_cache()}) and the hub "
        f"cannot be reached{offline}. To run it, download it once where there is a network: `huggingface-cli "
        f"download {repo}` (gated repos need {login} first){instead}.")

"""Names that are a local path or a Hugging Face hub name (models, datasets), and failing fast without a
network.

A name that can only be a path and does not exist is refused at once, instead of reaching the hub client
and its "Repo id must be in the form ..." error. Before anything is loaded from the hub, one short request
tells whether the hub answers; when it does not, the hub clients switch to offline mode, so a copy in the
local cache still loads and anything else fails in seconds instead of after a minute of retries.
"""

from __future__ import annotations

import os
from pathlib import Path

from qt.training.config import ConfigError

HUB_PROBE_TIMEOUT_S = 5
NOT_CACHED_OFFLINE = "not in the Hugging Face cache and the hub cannot be reached (or HF_HUB_OFFLINE is set)"


def is_local_path(name: str) -> bool:
    """Whether `name` can only be a local path: it exists, or it is not of the hub's NAME or OWNER/NAME
    form (it starts with . or /, or has more than one /)."""
    return Path(name).exists() or name.startswith((".", "/")) or name.count("/") > 1 or "\\" in name


def hub_offline() -> bool:
    """Whether the hub clients work from the local cache only (HF_HUB_OFFLINE, or the hub did not answer)."""
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE


def use_cache_if_hub_unreachable() -> None:
    """Call before loading a hub name: switches the hub clients to offline mode when the hub does not answer
    within HUB_PROBE_TIMEOUT_S (through the client's own session, so proxies apply)."""
    from huggingface_hub import constants, get_session
    if hub_offline():
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # no DNS, no route, refused, timed out: each is its own exception type
        constants.HF_HUB_OFFLINE = True  # read at every call by huggingface_hub and transformers
        os.environ["HF_HUB_OFFLINE"] = "1"  # for clients imported later (datasets copies it at import)


def hub_error(what: str, error: Exception, advice: str) -> ConfigError:
    """The one-line error for `what`, a name that is no local path and failed to load from the hub with
    `error`."""
    if hub_offline():
        reason = f"it is {NOT_CACHED_OFFLINE}"
    else:
        reason = f"loading it from the Hugging Face hub failed: {str(error).strip().splitlines()[0]}"
    return ConfigError(f"cannot load {what}: there is no such local path, and {reason}; {advice}")

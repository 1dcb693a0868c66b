"""Where a model comes from: a local checkpoint directory, or a Hugging Face Hub id ("org/name")
fetched into (or found in) the standard hub cache, as ``vllm serve org/name`` does.

Only the files the runtime reads are downloaded (``HUB_FILES``: config, safetensors weights and
their index, tokenizer, generation config, chat template), never pickles. The cache is the one
``huggingface_hub`` uses (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache/huggingface/hub);
``HF_HUB_OFFLINE=1`` reads it without touching the network. Both are read at each call, so a
process can change them after import.
"""

from __future__ import annotations

import os
import re

from .checkpoint import CheckpointError

# What the runtime reads from a checkpoint (api.load, checkpoint.py, chat.py, generation config).
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]

# A hub repo id: "name" or "org/name", letters, digits, "-", "_", "." (huggingface_hub's rule).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]{0,95}/)?[A-Za-z0-9][\w.\-]{0,95}$")
_TRUE = {"1", "on", "yes", "true"}


class ModelNotFoundError(CheckpointError):
    """A model source that is neither a checkpoint directory nor a hub id that can be had (a
    CheckpointError, as a missing directory always was)."""


def is_hub_id(source: str | os.PathLike) -> bool:
    """True when ``source`` names a hub repo rather than a local path: it is not an existing
    directory, has the shape of a repo id, and does not start like a path (/, ., ~)."""
    text = os.fspath(source)
    if os.path.isdir(text) or text.startswith(("/", ".", "~")) or ".." in text:
        return False
    return bool(_REPO_ID.match(text))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> str:
    """The hub cache huggingface_hub would use now (HF_HUB_CACHE, HF_HOME/hub, or the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def resolve_model_dir(source: str | os.PathLike, revision: str | None = None) -> str:
    """The local directory holding the checkpoint ``source`` names: ``source`` itself when it is a
    directory, else the snapshot of hub repo ``source`` at ``revision`` (default: main), downloaded
    into the hub cache unless HF_HUB_OFFLINE is set. Raises :class:`ModelNotFoundError` saying
    which it was and what to do."""
    text = os.fspath(source)
    if os.path.isdir(text):
        if revision is not None:
            raise ModelNotFoundError(
                f"revision {revision!r} given for {text}, a local directory (revisions are for "
                "hub ids)"
            )
        return text
    if not is_hub_id(text):
        raise ModelNotFoundError(
            f"model {text!r}: not a checkpoint directory (no such directory), and not a Hugging "
            "Face hub id (ORG/NAME)"
        )
    return _snapshot(text, revision)


def _snapshot(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline, cache = hub_offline(), hub_cache_dir()
    at = f"{repo_id!r} (revision {revision or 'main'})"
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=HUB_FILES,
        )
    except GatedRepoError:
        raise ModelNotFoundError(
            f"hub model {at} is gated: accept its terms on the hub and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"hub model {at} not found on the Hugging Face Hub (or private: set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"hub model {at}: no such revision on the hub") from None
    except HFValidationError as exc:
        raise ModelNotFoundError(f"model {repo_id!r}: not a valid hub id ({exc})") from None
    except LocalEntryNotFoundError:
        if offline:
            raise ModelNotFoundError(
                f"hub model {at} not found in the hub cache {cache}, and HF_HUB_OFFLINE is set so "
                "it cannot be downloaded: download it once online, or point to a local directory"
            ) from None
        raise ModelNotFoundError(
            f"hub model {at} is not in the hub cache {cache} and could not be downloaded (no "
            "connection to the hub?): check the network, or set HF_HUB_OFFLINE=1 to use the "
            "cache only"
        ) from None

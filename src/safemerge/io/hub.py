"""Hugging Face Hub ids wherever a model or adapter path is accepted.

A reference that is not an existing local path but looks like a Hub id — ``org/name``, with an
optional revision in mergekit's syntax ``org/name@rev`` — is fetched with
:func:`huggingface_hub.snapshot_download` (only the files a merge needs: safetensors weights and
their index, ``config.json``, tokenizer and adapter files; pickle weights only with
``RunOptions.allow_pickle``) and replaced by the local snapshot directory. Offline (``HF_HUB_OFFLINE=1``)
an id resolves from the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``: ``models--org--name/snapshots/<commit>/`` with ``refs/<branch>``);
a missing one is a one-line error that names the id and the command that fetches it.

``MODEL+ADAPTER`` references are split first (:func:`split_model_ref`), so each side may be a
path or a Hub id: ``org/base@main+org/lora``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from safemerge.errors import CheckpointError
from safemerge.options import RunOptions, or_default

# org/name with Hub's allowed characters, optionally @revision (a branch, tag or commit hash)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>[\w.\-/]+))?$")

# Everything a merge, an evaluation or an adapter application reads from a model repository.
MODEL_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template*",
    "adapter_config.json",
)
PICKLE_PATTERNS = ("*.bin", "*.bin.index.json", "*.pt")
# Small files only: enough to check that every id and revision exists before any weight download.
METADATA_PATTERNS = ("config.json", "*.safetensors.index.json", "adapter_config.json")


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` → ``("org/name", "rev")``; ``None`` when ``ref`` is not Hub-id shaped."""
    m = _HUB_ID.match(str(ref))
    if m is None or str(ref).startswith((".", "~")) or ".." in m.group("repo"):
        return None
    return m.group("repo"), m.group("rev")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` read now (huggingface_hub freezes it at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The Hugging Face cache directory with huggingface_hub's precedence, read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _fetch_command(repo: str, rev: str | None) -> str:
    return f"hf download {repo}" + (f" --revision {rev}" if rev else "")


def download_snapshot(ref: str, *, options: RunOptions | None = None, patterns: Iterable[str] | None = None) -> Path:
    """The local snapshot directory of Hub id ``ref`` (downloaded unless offline or cached); pickle weights
    are fetched only with ``options.allow_pickle``, nothing but ``patterns`` when given.

    Raises:
        CheckpointError: the id is unknown, gated, not cached while offline, or the Hub is unreachable.
    """
    parsed = parse_hub_id(ref)
    if parsed is None:
        raise CheckpointError(f"{ref!r} is not a Hugging Face Hub id", "use org/name or org/name@revision")
    repo, rev = parsed
    # huggingface_hub's client (~0.1 s to import) only when a Hub id is resolved: not for local paths
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    pickles = PICKLE_PATTERNS if or_default(options).allow_pickle else ()
    allow = list(patterns) if patterns is not None else [*MODEL_PATTERNS, *pickles]
    offline = hub_offline()
    try:
        path = snapshot_download(repo, revision=rev, cache_dir=str(hub_cache_dir()), allow_patterns=allow,
                                 local_files_only=offline)
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"revision {rev!r} of {repo} does not exist on the Hub",
                              "check the branch, tag or commit after '@'") from exc
    except GatedRepoError as exc:
        raise CheckpointError(f"{repo} is gated on the Hub",
                              f"accept its licence on huggingface.co/{repo} and log in: hf auth login") from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"model {ref!r} is neither a local path nor a Hub repository",
                              "check the path or id (private repositories need: hf auth login)") from exc
    except LocalEntryNotFoundError as exc:
        where = f"the local Hugging Face cache ({hub_cache_dir()})"
        if offline:
            raise CheckpointError(f"{ref!r} is not a local path and not in {where}; HF_HUB_OFFLINE=1 forbids "
                                  "downloading it",
                                  f"fetch it once online: {_fetch_command(repo, rev)}") from exc
        raise CheckpointError(f"cannot reach the Hugging Face Hub to fetch {ref!r}, and it is not in {where}",
                              f"check the network, or fetch it elsewhere: {_fetch_command(repo, rev)}") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"downloading {ref!r} from the Hub failed ({type(exc).__name__})",
                              f"retry, or fetch it with: {_fetch_command(repo, rev)}") from exc
    return Path(path)


def resolve_local(ref: str | Path, *, options: RunOptions | None = None) -> Path:
    """A local path for a model/adapter reference: the path itself if it exists, else the Hub
    snapshot of a Hub id. Anything else is returned unchanged (the caller reports it missing)."""
    p = Path(str(ref)).expanduser()
    if p.exists() or parse_hub_id(str(ref)) is None:
        return p
    return download_snapshot(str(ref), options=options)


def split_model_ref(ref: str) -> tuple[str, str | None]:
    """Split mergekit's ``model+adapter`` reference. A path that exists as written is never split."""
    if Path(ref).expanduser().exists() or "+" not in ref:
        return ref, None
    base, _, adapter = ref.rpartition("+")
    return base, adapter


def resolve_model_ref(ref: str | Path, *, options: RunOptions | None = None) -> tuple[Path, Path | None]:
    """``MODEL[+ADAPTER]`` → local ``(model_dir, adapter_dir or None)``, Hub ids fetched."""
    model, adapter = split_model_ref(str(ref))
    return (resolve_local(model, options=options),
            None if adapter is None else resolve_local(adapter, options=options))


def prefetch_metadata(refs: Iterable[str]) -> None:
    """Check that every Hub id among ``refs`` (``MODEL+ADAPTER`` split) exists before any weights
    are downloaded: fetching only config/index files fails fast on a wrong id or revision."""
    for ref in refs:
        for part in split_model_ref(str(ref)):
            if part is not None and not Path(part).expanduser().exists() and parse_hub_id(part) is not None:
                download_snapshot(part, patterns=METADATA_PATTERNS)

"""Models from the Hugging Face Hub, fetched by huggingface-hub (its cache, resumable downloads, progress bars).

A repo holds either a model directory (``config.json`` and safetensors, in MLX
or transformers layout), fetched whole, or GGUF files, of which one is fetched
for the importer: the one named with ``--file``, the only one, or the Q4_K_M
one. This module only fetches and finds; ``models.py`` decides what becomes of
a download (a GGUF is converted into the store there).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from ..errors import UrialError, one_line

MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
SMALL_FILES = [p for p in MODEL_FILES if p != "*.safetensors"]  # fetched beside a GGUF: keeps the cache complete
PREFERRED_GGUF = "q4_k_m"  # llama.cpp's default quantization when a repo offers several


@dataclass
class Snapshot:
    """A repo's files on disk: a model directory, or the folder holding the GGUF named ``gguf``."""

    folder: Path
    gguf: Optional[str]
    downloaded: bool  # False: taken from the cache without asking the Hub


def pull_command(name: str) -> str:
    return f"urial-edge models pull {name}"


def offline() -> bool:
    """HF_HUB_OFFLINE is set: huggingface-hub will not touch the network."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def not_downloaded(label: str, repo: str) -> str:
    why = "offline mode is on (HF_HUB_OFFLINE)" if offline() else "the Hugging Face Hub cannot be reached"
    return (f"model {label!r} ({repo}) is not downloaded and {why}; connect to the internet and run "
            f"`{pull_command(label)}`")


def check_repo_id(spec: str) -> str:
    """``org/name`` as the Hub spells repo ids; a one-line error otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
        valid = spec.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise UrialError(f"not a Hugging Face repo id (org/name): {spec!r}")
    return spec


def remote_files(repo: str) -> Optional[Dict[str, Optional[int]]]:
    """The repo's files and their sizes, or None when the Hub cannot be reached."""
    if offline():
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo, files_metadata=True)
    except GatedRepoError:
        raise UrialError(f"{repo} is gated: accept its terms at https://huggingface.co/{repo}, then log in with "
                         "`hf auth login`") from None
    except RepositoryNotFoundError:
        raise UrialError(f"no model {repo!r} on the Hugging Face Hub (if it is private, log in with "
                         "`hf auth login`)") from None
    except Exception:  # no connection, a proxy, the Hub is down: the cache may still have it
        return None
    return {s.rfilename: s.size for s in info.siblings or []}


def choose(files: Iterable[str], repo: str, file: Optional[str] = None) -> Optional[List[str]]:
    """The patterns to fetch: the model directory or one GGUF file; None if the repo has neither."""
    names = list(files)
    if file:
        if file not in names:
            raise UrialError(f"{repo} has no file {file!r}")
        return [file] + SMALL_FILES
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return MODEL_FILES
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if not ggufs:
        return None
    if len(ggufs) == 1:
        return [ggufs[0]] + SMALL_FILES
    preferred = [n for n in ggufs if PREFERRED_GGUF in n.lower()]
    if len(preferred) == 1:
        return [preferred[0]] + SMALL_FILES
    shown = ", ".join(ggufs[:4]) + (", ..." if len(ggufs) > 4 else "")
    raise UrialError(f"{repo} has {len(ggufs)} GGUF files ({shown}); pick one with --file")


def _snapshot(folder: Path, patterns: List[str], downloaded: bool) -> Snapshot:
    return Snapshot(folder, None if patterns is MODEL_FILES else patterns[0], downloaded)


def cached(repo: str, file: Optional[str] = None) -> Optional[Snapshot]:
    """What the local Hugging Face cache holds of ``repo`` (no network), or None."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, allow_patterns=[file] if file else MODEL_FILES, local_files_only=True))
    except Exception:  # not cached, or cached only in part
        return None
    patterns = choose((p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()), repo, file)
    return _snapshot(folder, patterns, False) if patterns else None


def fetch(repo: str, label: str, file: Optional[str] = None, cache_first: bool = False) -> Snapshot:
    """The repo's model directory or GGUF on disk: downloaded (or brought up to date) when the Hub answers,
    else from the cache. ``cache_first`` skips asking the Hub when the cache has it."""
    if cache_first:
        found = cached(repo, file)
        if found is not None:
            return found
    files = remote_files(repo)
    if files is None:
        found = None if cache_first else cached(repo, file)
        if found is None:
            raise UrialError(not_downloaded(label, repo))
        return found
    patterns = choose(files, repo, file)
    if patterns is None:
        raise UrialError(f"{repo} has neither a model directory (config.json and *.safetensors) nor a .gguf file")
    return _snapshot(download(repo, patterns), patterns, True)


def download(repo: str, patterns: List[str]) -> Path:
    """``snapshot_download`` with huggingface-hub's progress bars; an interrupted download resumes."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:
        raise UrialError(f"downloading {repo} failed: {one_line(e)}") from None


def remote_size(repo: str) -> Optional[int]:
    """Bytes a pull of ``repo`` would fetch, if the Hub answers."""
    files = remote_files(repo)
    patterns = choose(files, repo) if files else None
    if not patterns:
        return None
    from huggingface_hub.utils import filter_repo_objects

    return sum(files[n] or 0 for n in filter_repo_objects(list(files), allow_patterns=patterns))

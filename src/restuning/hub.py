"""Where a checkpoint is: a local folder, or a Hugging Face Hub repository resolved through `huggingface_hub`
(its cache first; offline with `HF_HUB_OFFLINE=1`, from the cache alone)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .errors import CheckpointError


def locate(source: str | Path, revision: str | None = None, subfolder: str | None = None) -> Path:
    """The local folder holding the checkpoint `source` names: `source` itself when it is a folder, else
    the snapshot of Hub repository `source` (e.g. "org/name") at `revision` (default: its main branch) that
    holds both checkpoint files (`subfolder` of it, for a second adapter saved beside the first).

    Raises CheckpointError when `source` is neither a folder nor a repository the Hub (or, offline, its
    cache) can provide with both files.
    """
    path = Path(source)
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    where = f"{source}/{subfolder}" if subfolder else str(source)
    files = []
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            files.append(Path(hf_hub_download(str(source), name, revision=revision, subfolder=subfolder,
                                              library_name="restuning")))
    except HFValidationError:
        raise CheckpointError(f"{where}: no such folder (and not a Hub repository id such as 'org/name')") from None
    except (LocalEntryNotFoundError, EntryNotFoundError, HfHubHTTPError, OSError) as err:
        # offline and not cached; no such repository, revision or file; no network
        raise CheckpointError(f"{where}: no such folder, and the Hub repository {str(source)!r} "
                              f"(revision {revision or 'main'}) cannot provide {CONFIG_NAME} and {WEIGHTS_NAME}: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    return files[0].parent

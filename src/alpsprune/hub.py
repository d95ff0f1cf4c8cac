"""Publishing an output folder to the Hugging Face Hub (`alpsprune prune ... --push-to-hub REPO`).

Everything goes through `huggingface_hub.HfApi` (create the repository, upload the folder in one commit), so
tokens, `HF_ENDPOINT` and proxies work as in every other Hugging Face tool. What can be checked without the
network (the repository name, offline mode, a token) is checked before any pruning starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import OutputError

# Never published: a half-written checkpoint of a resumed run, temporary files.
UPLOAD_IGNORE = ["checkpoint/**", "*.tmp", "*.tmp-*"]


def check_push_target(repo_id: str) -> None:
    """Fail early, with the fix, when a push could not work.

    :raises OutputError: malformed repository id, offline mode, or no Hugging Face token.
    """
    try:
        import huggingface_hub
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise OutputError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise OutputError(f"--push-to-hub {repo_id!r} is not a valid repository id ({exc})") from None
    if "/" not in repo_id:
        raise OutputError(f"--push-to-hub {repo_id!r}: give the repository as USER/NAME or ORG/NAME")
    if huggingface_hub.constants.is_offline_mode():
        raise OutputError("--push-to-hub is impossible in offline mode (HF_HUB_OFFLINE is set)")
    if huggingface_hub.get_token() is None:
        raise OutputError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Create `repo_id` (a model repository; kept if it exists) and upload `folder` to it in one commit.
    Returns the repository URL.

    :raises OutputError: the Hub refused or could not be reached; the folder stays as it is.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=commit_message or f"alpsprune: upload {folder.name}",
            ignore_patterns=UPLOAD_IGNORE,
        )
    except Exception as exc:  # HTTP, auth and network errors alike: the saved folder is what matters
        first = str(exc).strip().splitlines()
        raise OutputError(
            f"the model is saved in {folder}, but pushing it to {repo_id} failed "
            f"({type(exc).__name__}: {first[0] if first else ''}); retry with `hf upload {repo_id} {folder}`"
        ) from exc
    return str(url)

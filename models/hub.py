"""Names that may be local folders or Hugging Face Hub repos: a fast check, the one line for a name not found,
and the download of a model's config and safetensors."""

from pathlib import Path

from models.errors import first_line


def not_found(flag: str, name: str, error: BaseException) -> str:
    """One line for a `--model`/`--tokenizer`/dataset name that is neither a local folder nor served by the hub.

    transformers answers a mistyped folder with "Repo id must be in the form 'repo_name'": true of hub
    names, useless to someone who mistyped a path. Say which of the two the name could have been.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return f"{flag} {name}: no such folder; check the path"
    reason = first_line(error)
    return (
        f"{flag} {name}: no such local folder, and the Hugging Face Hub did not serve it ({reason}); check the "
        "path, or download it where the hub is reachable and pass its folder (HF_HUB_OFFLINE=1 uses the local cache)"
    )


def check_hub_name(flag: str, name: str, repo_type: str = "model") -> None:
    """Fail within seconds when `name` cannot come from the hub: not a repo id, or the hub unreachable (one 5 s
    request, no retries; transformers and datasets retry for ~20 s) and nothing of it in the local cache.
    Offline mode (HF_HUB_OFFLINE=1) leaves it to the library, which then reads the cache only."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise ValueError(not_found(flag, name, e)) from None
    if constants.HF_HUB_OFFLINE:
        return
    try:
        HfApi().repo_info(name, repo_type=repo_type, timeout=5)
    except Exception as e:  # connection, HTTP 401/404 (many types)
        cached = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{name.replace('/', '--')}"
        if not cached.is_dir():
            raise ValueError(not_found(flag, name, e)) from None


def check_model_dir(path: Path) -> None:
    """A `save_pretrained` folder: config.json and safetensors weights (ValueError naming what is missing)."""
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {path} is not a save_pretrained folder: it has no config.json")
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(
            f"--model {path} has no model.safetensors: re-save it with save_pretrained(safe_serialization=True)"
        )


def resolve_model_dir(model: str) -> Path:
    """A local `save_pretrained` folder, or a hub name downloaded (safetensors and config only)."""
    path = Path(model)
    if path.exists():
        check_model_dir(path)
        return path
    from huggingface_hub import snapshot_download

    check_hub_name("--model", model)
    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # hub errors come in many types (offline, HTTP, validation); all mean the same here
        raise ValueError(not_found("--model", model, e)) from None

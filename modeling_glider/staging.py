"""Writing folders so that they appear complete or not at all: fill a folder beside the target, then rename it."""

import os
import secrets
from pathlib import Path


def _sibling(target: Path) -> Path:
    # Created by the caller with the usual permissions (mkstemp/mkdtemp would make them private to the user).
    return target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"


def staging_dir(target: Path) -> Path:
    """A new empty folder beside `target`, to be filled and then renamed to it with `publish`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target)
    staging.mkdir()
    return staging


def publish(staging: Path, target: Path) -> None:
    """Rename a filled staging folder to `target`, which must not exist or be empty."""
    if target.exists():
        target.rmdir()
    os.replace(staging, target)

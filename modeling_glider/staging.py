"""Writing files and folders so that they appear complete or not at all: the new content is written in full under a
name beside the target (same folder, so same filesystem), then renamed over it. A rename is atomic; a failure before
it removes what was staged, and a kill before it leaves the target as it was (and a `.<name>.<random>.tmp` beside it).
"""

import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _sibling(target: Path, suffix: str = "tmp") -> Path:
    # Created by the caller with the usual permissions (mkstemp/mkdtemp would make them private to the user).
    return target.parent / f".{target.name}.{secrets.token_hex(4)}.{suffix}"


def staging_file(target: Path) -> Path:
    """A new name beside the file `target`: write the new content there, then `os.replace` it over `target`."""
    return _sibling(target)


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


def with_default_modes(folder: Path) -> None:
    """Give every file in `folder` the mode a new file gets there (0666 less the umask): writers that stage through
    private temporary files (safetensors weights from Transformers) would leave a saved model readable by its owner
    alone on a shared machine."""
    probe = _sibling(folder / "mode")
    with open(probe, "x"):
        pass
    try:
        mode = stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.unlink()
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink():
            os.chmod(entry, mode)


def missing_parents(target: Path) -> list[Path]:
    """The folders above `target` that do not exist yet, deepest first: what making `target` would create."""
    return [parent for parent in (target.parent, *target.parent.parents) if not parent.exists()]


def discard(staging: Path, made_parents: list[Path] = ()) -> None:
    """Remove a staging folder, and then the parent folders made for it (`missing_parents`) while they are empty."""
    shutil.rmtree(staging, ignore_errors=True)
    for parent in made_parents:
        try:
            parent.rmdir()
        except OSError:  # not empty: something else writes there too
            break


def move_into(staging: Path, target: Path, names: list[str]) -> None:
    """Rename each `staging/<name>` to `target/<name>`, which must not exist; on an error, those moved go back."""
    moved = []
    try:
        for name in names:
            if os.path.lexists(target / name):
                raise FileExistsError(f"{target / name} already exists.")
            os.replace(staging / name, target / name)
            moved.append(name)
    except BaseException:
        for name in moved:
            os.replace(target / name, staging / name)
        raise


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A new empty folder beside `target` (which must not exist or be empty) to fill in the `with` block; it becomes
    `target` when the block ends (a block that writes nothing just makes `target`, as an empty folder). On an error it
    is removed, with the parent folders made for it: nothing is left."""
    made_parents = missing_parents(target)
    staging = staging_dir(target)
    try:
        yield staging
        if any(staging.iterdir()):
            publish(staging, target)
        else:
            staging.rmdir()
            target.mkdir(exist_ok=True)
    except BaseException:
        discard(staging, made_parents)
        raise


def set_aside(target: Path) -> list[Path]:
    """Folders that a `replaced_folder` swap killed between its two renames left beside `target`: the old content."""
    return sorted(target.parent.glob(f".{target.name}.*.old"))


@contextmanager
def replaced_folder(target: Path, keep: Callable[[Path], bool]) -> Iterator[Path]:
    """An empty folder to write the new content of the folder `target` into, in the `with` block; when the block ends,
    it takes the place of `target`. Entries of the old `target` that the block did not write and `keep(entry)` accepts
    (files saved there by others: a tokenizer, notes) are carried over. A block that writes nothing changes nothing.

    The new folder is staged beside `target`, the kept entries are hard-linked into it (copied where the filesystem
    has no hard links), then the old folder is renamed aside, the new one renamed to `target`, and the old one
    deleted. An error in the block, or a kill before the swap, leaves `target` as it was; a kill after it leaves the
    new folder, whole. Between the two renames `target` is missing and the old folder is whole beside it
    (`set_aside(target)`); the next save over `target` warns about it.

    A folder that cannot be renamed (a mount point, the working directory or one of its parents, or one whose parent
    is read-only) is written differently: the block writes into a staging folder inside `target`, whose files then
    replace the old ones one by one (`config.json` last), each by an atomic rename. No file is ever half written,
    but a kill amid those renames leaves old and new files side by side.
    """
    target = Path(os.path.abspath(target))
    if target.is_symlink():
        target = target.resolve()  # replace the folder it points to, not the link
    if not target.exists() or not any(target.iterdir()):
        for folder in set_aside(target):
            warnings.warn(f"{folder} holds what {target} held before a save there was interrupted.", stacklevel=4)
        with staged_folder(target) as staging:
            yield staging
        return
    inside = not _swappable(target)
    staging = target / _sibling(target).name if inside else staging_dir(target)
    staging.mkdir(exist_ok=True)
    try:
        yield staging
        if any(staging.iterdir()):
            (_move_in if inside else _swap)(staging, target, keep)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swappable(target: Path) -> bool:
    working = Path.cwd().resolve()
    return (
        os.access(target.parent, os.W_OK | os.X_OK)
        and not os.path.ismount(target)
        and target.resolve() not in (working, *working.parents)
    )


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, destination, follow_symlinks=False)


def _swap(staging: Path, target: Path, keep: Callable[[Path], bool]) -> None:
    for entry in target.iterdir():
        if keep(entry) and not os.path.lexists(staging / entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(entry), str(staging / entry.name))
    os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
    aside = _sibling(target, "old")
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    for entry in aside.iterdir():  # written into the old folder by another program since it was listed
        if keep(entry) and not os.path.lexists(target / entry.name):
            os.replace(entry, target / entry.name)
    shutil.rmtree(aside, ignore_errors=True)


def _move_in(staging: Path, target: Path, keep: Callable[[Path], bool]) -> None:
    written = sorted(staging.iterdir(), key=lambda entry: entry.name == "config.json")  # the config last
    names = {entry.name for entry in written}
    stale = [entry for entry in target.iterdir() if entry != staging and entry.name not in names and not keep(entry)]
    for entry in written:
        os.replace(entry, target / entry.name)
    for entry in stale:
        entry.unlink()


def all_but_weights(variant: str | None) -> Callable[[Path], bool]:
    """`keep` for `replaced_folder` by `save_pretrained`: which entries of a model folder a new save of the weights
    `variant` keeps: all but the earlier weights of that variant (one file, shards, index), which it replaces.
    (Transformers removes only stale shards, and so can leave an old `model.safetensors` beside new shards.)"""
    single = f"model.{variant}.safetensors" if variant else "model.safetensors"
    index = f"model.safetensors.index.{variant}.json" if variant else "model.safetensors.index.json"
    shard = re.compile(re.escape(single.removesuffix(".safetensors")) + r"-\d{5}-of-\d{5}\.safetensors")
    return lambda entry: not (entry.is_file() and (entry.name in (single, index) or shard.fullmatch(entry.name)))

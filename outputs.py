"""Result folders written without losing anything: `OutputFolder` checks a folder before any computing, fills a hidden
temporary folder beside it and moves it into place at the end, replacing only what is provably an earlier result of
this program (settings.json's `written_by` marker and the SHA-256 of every file it wrote).

Used by the command line, `ConceptResult.save` (a video result's too) and `python -m cogvideox.example`; what it
refuses, and why, is in `OutputFolder`'s docstring.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file

if TYPE_CHECKING:
    from saliency import ConceptResult

# settings.json's "written_by": with its "files" (each file's SHA-256) it proves a folder is this program's result
WRITTEN_BY = "concept_attention"
RESULT_FOLDERS = ("heatmaps", "masks")
MAX_SETTINGS_BYTES = 16 * 2**20  # a settings.json larger than this is not one of ours


def file_stems(concepts: list[str], name_max: int = 255) -> list[str]:
    """ "NN_concept" per concept: characters other than letters and digits become "_", and the name is cut so that
    "NN_concept.webp" (a video's heatmap animation, the longest suffix written) fits `name_max` bytes (the index keeps
    names unique)."""
    stems = []
    for i, name in enumerate(concepts):
        stem = f"{i:02d}_{''.join(ch if ch.isalnum() else '_' for ch in name)}"
        while len(stem.encode()) > name_max - len(".webp"):
            stem = stem[:-1]
        stems.append(stem)
    return stems


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def listed_files(folder: Path) -> dict[str, str] | None:
    """The files (relative path -> SHA-256) that `folder/settings.json` says this program wrote, or None when it has
    no such settings.json."""
    settings = folder / "settings.json"
    try:
        if settings.is_symlink() or not settings.is_file() or settings.stat().st_size > MAX_SETTINGS_BYTES:
            return None
        record = json.loads(settings.read_text())
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) and record.get("written_by") == WRITTEN_BY else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return None
    return files


def foreign_files(folder: Path) -> list[str]:
    """What in `folder` this program did not write, as relative paths: everything, when it is not one of its results
    (no settings.json with the marker); else every file not listed there, or changed since (a different SHA-256),
    and anything that is not a plain file or folder. An empty list: the folder is provably an earlier result."""
    listed = listed_files(folder)
    foreign = []
    for root, dirs, files in os.walk(folder, onerror=lambda err: foreign.append(f"{err.filename} (unreadable)")):
        rel = Path(root).relative_to(folder)
        for name in sorted(dirs):
            path = rel / name
            if rel != Path(".") or name not in RESULT_FOLDERS or (Path(root) / name).is_symlink():
                foreign.append(f"{path.as_posix()}/")
                dirs.remove(name)  # not descended into, and never deleted
        for name in sorted(files):
            key, path = (rel / name).as_posix(), Path(root) / name
            if listed is None or path.is_symlink() or not path.is_file():
                foreign.append(key)
            elif key != "settings.json" and (key not in listed or sha256(path) != listed[key]):
                foreign.append(key + (" (changed)" if key in listed else ""))
    return foreign


def describe(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # tags this machine's temporary folders


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a pid we cannot test: keep its folder
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary folders beside `out` (`.NAME.HOST-PID.*.partial` and `.old`) that a run of this machine
    left when it was killed (its process is gone); a running process's folders are kept. -> the folders removed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.([0-9a-f]{{8}})-(\d+)\.[^./]+\.(partial|old)")
    removed = []
    try:
        candidates = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return removed
    for path in candidates:
        match = pattern.fullmatch(path.name)
        if match and match[1] == HOST and not process_alive(int(match[2])) and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def current_folder() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:  # the current folder was deleted
        return None


class OutputFolder:
    """A result folder written all at once: checked and started before any computing, filled in a hidden temporary
    folder beside `out`, then moved into place, so that an interrupted or failed run leaves nothing half-written and
    two runs never mix their files (the last one to finish wins).

    Nothing of the user's is deleted or overwritten: a folder is replaced only when it is provably an earlier result of
    this program (its settings.json carries the marker `written_by` and the SHA-256 of every file written, and it holds
    nothing else, unchanged), and it is checked again just before the move. Refused, with what to do: an empty name, a
    path that is a file, a parent that cannot be written, any other non-empty folder, a folder that holds one of
    `inputs`, the current folder or one holding it (the shell would be left in a deleted folder), and a mount point
    (it cannot be renamed). A symlink is followed: the result replaces the folder it points to. `replaces` says
    whether an earlier result will be replaced. Temporary folders of killed runs (named with host and process id) are
    removed. Concept file names are created in the temporary folder at once, so a name the file system refuses fails
    here, not after the model has run."""

    def __init__(self, out: str | Path, concepts: list[str], inputs: tuple[str | Path, ...] = ()):
        if not isinstance(out, (str, os.PathLike)):
            raise ValueError(f"the output folder {out!r} is a {type(out).__name__}; give a path")
        if not str(out).strip():
            raise ValueError("the output folder name is empty; give a folder, e.g. --out out/cat")
        self.out = Path(out).expanduser().resolve()  # a symlink is followed: its target is written
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"the output folder {self.out} is a file; give a folder that is new or holds a result")
        for item in inputs:
            item = Path(item).expanduser().resolve()
            if item == self.out or self.out in item.parents:
                raise ValueError(
                    f"the input {item} lies inside the output folder {self.out}, which would be replaced; "
                    "give another --out"
                )
        cwd = current_folder()
        if cwd is not None and (cwd == self.out or self.out in cwd.parents):
            raise ValueError(
                f"the output folder {self.out} is the current folder or holds it, and a result replaces its folder "
                "whole; give a folder inside it, e.g. --out result"
            )
        if self.out.is_dir() and os.path.ismount(self.out):
            raise ValueError(
                f"the output folder {self.out} is a mount point, which cannot be replaced by a rename; give a folder "
                f"inside it, e.g. --out {self.out / 'result'}"
            )
        self.replaces = False
        if self.out.is_dir():
            self._check_replaceable()
            self.replaces = any(self.out.iterdir())
        remove_stale(self.out)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            prefix = f".{self.out.name}.{HOST}-{os.getpid()}."
            self.tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=self.out.parent))
        except OSError as err:
            raise ValueError(
                f"cannot write the output folder {self.out} ({err.strerror}); give a writable --out"
            ) from None
        try:
            (self.tmp / "heatmaps").mkdir()
            (self.tmp / "masks").mkdir()
            name_max = os.pathconf(self.tmp, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
            self.stems = file_stems(concepts, name_max)
            for stem in self.stems:
                (self.tmp / "heatmaps" / f"{stem}.png").touch()
        except OSError as err:
            self.discard()
            raise ValueError(f"cannot write {err.filename} in {self.out.parent} ({err.strerror}); rename the concept "
                             "or give another --out") from None  # fmt: skip

    def _check_replaceable(self, during: bool = False) -> None:
        """Raise unless `out` is empty or provably an earlier result of this program."""
        try:
            foreign = foreign_files(self.out) if any(self.out.iterdir()) else []
        except OSError as err:
            raise ValueError(f"cannot read the output folder {self.out} ({err.strerror}); give another --out") from None
        if foreign:
            when = " (they appeared while this run was computing; its result was discarded)" if during else ""
            raise ValueError(
                f"the output folder {self.out} holds files that are not a result of this program "
                f"({describe(foreign)}){when}; nothing was changed: give a new or empty folder, or remove these "
                "files yourself"
            )

    def write(self, result: ConceptResult) -> Path:
        """Write every file of `result` (its `write_files`) into the temporary folder, with settings.json, then move it
        into place as `out`."""
        try:
            tmp = self.tmp
            result.write_files(tmp, self.stems)
            tensors = {"maps": result.maps.contiguous()}
            tensors.update({f"grid.{k}": v.contiguous() for k, v in (result.grid or {}).items()})
            save_file(tensors, tmp / "maps.safetensors", metadata={"concepts": json.dumps(result.concepts)})
            record = {**result.record, "concepts": result.concepts, "settings": dataclasses.asdict(result.settings)}
            if result.source is not None:
                record.setdefault("image", str(result.source))
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            record["written_by"] = WRITTEN_BY
            record["files"] = {p.relative_to(tmp).as_posix(): sha256(p) for p in files}
            (tmp / "settings.json").write_text(json.dumps(record, indent=2) + "\n")
            self._move_into_place()
        finally:
            self.discard()
        return self.out

    def _move_into_place(self) -> None:
        for _ in range(5):  # another run may put its result in place between our two renames: retry
            try:
                os.rename(self.tmp, self.out)  # atomic; also replaces an empty folder
                return
            except FileNotFoundError:
                continue
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise ValueError(f"cannot move the result into {self.out} ({err.strerror})") from None
            self._check_replaceable(during=True)  # checked again: only an earlier result is ever moved aside
            old = self.tmp.with_name(self.tmp.name.removesuffix(".partial") + ".old")
            try:
                os.rename(self.out, old)
            except FileNotFoundError:
                continue
            try:
                os.rename(self.tmp, self.out)
                self.replaces = True  # said so at the end, also when that result appeared during this run
                return
            except OSError:
                continue
            finally:
                shutil.rmtree(old, ignore_errors=True)
        raise OSError(f"could not move the result into {self.out}: another process keeps writing there")

    def discard(self) -> None:
        """Remove the temporary folder (after a move, or when the run fails)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

"""Where ddguide writes: output paths checked before any work, one writer per output, folders staged.

- :func:`check_output` refuses an output that cannot be written (a folder where a file is meant or the reverse,
  a path under a regular file, a name too long for the temporary files beside it) before anything is computed.
- :func:`guard` holds an exclusive lock beside the output for the whole run (a second writer is refused with one
  line; the kernel drops the lock of a killed process), creates missing parent folders (and removes them again
  when the run fails) and deletes the temporary files a killed run left for this output.
- :func:`staged_folder` writes a folder output into a hidden sibling and renames it into place at the end, so
  a killed, failed or full-disk run leaves the previous content; a non-empty folder is refused unless it is
  ddguide's own output of the same kind (then it is replaced whole). With ``resume`` the staging folder
  survives a kill and the same run continues in it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from ddguide.core.errors import UserError

NAME_LIMIT = 200  # bytes; temporary files add a prefix and a suffix, and file systems stop at 255


def _sibling(path: Path, tag: str) -> Path:
    """A hidden name beside ``path`` for ``tag`` (hashed when the name is long)."""
    name = path.name if len(os.fsencode(path.name)) <= NAME_LIMIT - 40 else \
        hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]
    return path.with_name(f".{name}.ddguide-{tag}")


def _existing_ancestor(path: Path) -> Path:
    p = path.parent
    while not p.exists() and p != p.parent:
        if p.is_symlink():  # a dangling link
            break
        p = p.parent
    return p


def check_output(path: str | os.PathLike, *, folder: bool) -> Path:
    """Refuse an output path that cannot hold a file (``folder=False``) or a folder, before any work."""
    path = Path(path)
    if not path.name or len(os.fsencode(path.name)) > NAME_LIMIT:
        raise UserError(f"{str(path)[:80]}...: the name is too long (at most {NAME_LIMIT} bytes)"
                        if path.name else f"{path}: not a usable output name")
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name")
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise UserError(f"{path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write in {ancestor} (permission denied)")
    return path


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files and folders that runs writing ``path`` leave when killed (atomic writes, checkpoints,
    loss curves, torchrun parts, staging folders)."""
    parent = path.parent
    if not parent.is_dir():
        return []
    stem = path.name.split(".")[0] if "." in path.name else path.name
    prefixes = (f".tmp-{path.name}.", f".tmp-{stem}.ckpt.", f".tmp-{stem}.loss.", f".tmp-{stem}.part")
    staging = _sibling(path, "staging-").name
    found = []
    for p in parent.iterdir():
        if p.name.startswith(prefixes) or (p.name.startswith(staging) and not _alive(p.name[len(staging):])):
            found.append(p)
    return found


def _alive(pid_text: str) -> bool:
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def guard(path: str | os.PathLike, *, folder: bool, lock: bool = True) -> Iterator[Path]:
    """Check ``path``, create its missing parents, lock it against a second writer and remove the temporaries
    of killed runs; on failure the parents it created are removed again (a refused run leaves nothing)."""
    path = check_output(path, folder=folder)
    created: list[Path] = []
    p = path.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    fd = None
    lock_path = _sibling(path, "lock")
    ok = False
    try:
        for d in reversed(created):
            try:
                d.mkdir()
            except OSError as e:
                raise UserError(f"{path}: cannot create folder {d} ({e.strerror})") from None
        if lock:
            fd = _acquire(lock_path, path)
        _recover(path)
        for stale in stale_temporaries(path):
            _remove(stale)
        yield path
        ok = True
    finally:
        if fd is not None:
            lock_path.unlink(missing_ok=True)
            os.close(fd)
        if not ok:
            for d in created:
                with contextlib.suppress(OSError):
                    d.rmdir()


def _acquire(lock_path: Path, path: Path) -> int:
    """An exclusive flock on ``lock_path`` (retried when another process removed the file meanwhile)."""
    for _ in range(10):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{path}: cannot write beside it ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{path}: another ddguide run is writing it{f' (pid {other})' if other else ''}; "
                            "wait for it or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)
    raise UserError(f"{path}: could not lock it (the lock file keeps changing)")


def _recover(path: Path) -> None:
    """A run killed between the two renames that replace a folder left the previous content as ``.old``: put it
    back when the folder is missing, else remove it."""
    old = _sibling(path, "old")
    if old.exists():
        if not path.exists():
            os.rename(old, path)
        else:
            _remove(old)


def join_when_complete(target: str | os.PathLike, parts: list[Path], join: Callable[[], object]) -> bool:
    """Call ``join`` once every one of ``parts`` exists, one process at a time (an exclusive lock beside
    ``target``): the shards of a job array finish in any order and the last one joins. False while a part is
    missing (or another shard joined them and removed the parts)."""
    lock_path = _sibling(Path(target), "join-lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{target}: cannot write beside it ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a shard that is joining
        if not all(p.is_file() for p in parts):
            return False
        join()
        lock_path.unlink(missing_ok=True)  # a shard still waiting on it finds the join done (or redoes it alike)
        return True
    finally:
        os.close(fd)


def samples_folder(folder: Path) -> bool:
    """Whether ``folder`` is ddguide's own samples output (or the shards of one): an index.csv or index parts,
    and nothing else but the images they list or numbered images (``000012.png``), grid.png and hidden files."""
    import re

    index = folder / "index.csv"
    listed: set[str | None] = set()
    if index.exists():
        try:
            with open(index, newline="", encoding="utf-8") as f:
                listed = {row.get("file") for row in csv.DictReader(f)}
        except (OSError, UnicodeDecodeError, csv.Error):
            return False
    elif not any(folder.glob("index.part*")):
        return False
    for p in folder.iterdir():
        if p.name.startswith(".") or p.name in ("index.csv", "grid.png") or p.name.startswith("index.part"):
            continue
        if not p.is_file() or (p.name not in listed and not re.fullmatch(r"\d{6,}\.png", p.name)):
            return False
    return True


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, what: str = "output", *, own: Callable[[Path], bool] | None = None,
                  resume: str | None = None, in_place: bool = False) -> Iterator[Path]:
    """Yield the folder to write ``out``'s content into; on success it becomes ``out``.

    ``own(out)`` says whether an existing non-empty ``out`` is ddguide's own output that may be replaced (else it
    is refused). ``resume``, a text naming the run (its options), keeps the staging folder across a kill and
    reuses it when the next run has the same text. ``in_place`` (shards of a torchrun job) writes into ``out``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if in_place:  # the shards of one job fill the folder together: whichever comes second finds it non-empty
        if own is not None and out.is_dir() and any(out.iterdir()) and not own(out):
            raise UserError(f"{out}: {what} folder exists and is not ddguide's; choose a new folder")
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    _recover(out)
    if out.is_dir() and any(out.iterdir()) and not (own and own(out)):
        raise UserError(f"{out}: {what} folder exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        stage = _sibling(out, "partial")
        marker = stage / ".ddguide-run"
        if stage.exists() and not (marker.is_file() and marker.read_text(encoding="utf-8") == resume):
            shutil.rmtree(stage)
        elif stage.exists():  # the same run, killed: its complete files stay, its half-written ones go
            for tmp in list(stage.rglob(".tmp-*")):
                _remove(tmp)
        stage.mkdir(exist_ok=True)
        marker.write_text(resume, encoding="utf-8")
    else:
        for stale in stale_temporaries(out):
            if stale.is_dir():
                _remove(stale)
        stage = _sibling(out, f"staging-{os.getpid()}")
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
    try:
        yield stage
    except BaseException:
        if resume is None:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    (stage / ".ddguide-run").unlink(missing_ok=True)
    if out.is_dir() and any(out.iterdir()):
        old = _sibling(out, "old")
        os.rename(out, old)
        os.rename(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(stage, out)  # replaces an empty folder

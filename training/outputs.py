"""Where a training run writes: checked before any work, locked against a second run, cleaned of leftovers.

- :func:`probe_writable` writes (and fsyncs) a probe file, so a read-only folder or a full disk is found
  before the dataset is scanned or a model is loaded, not when the first checkpoint or the archive is due.
- :class:`RunLock` holds ``.qzp-train.lock`` in the output folder(s) for the whole run: a second training
  pointed at the same output is refused, naming the first (pid, host, start time, archive). The lock is an
  OS file lock (``flock``), released by the OS when its process dies, so a lock left by a killed run is
  taken over (and said so), never mistaken for a live one.
- :func:`clean_leftovers` (called holding the lock) removes what a killed run leaves: half-written
  ``.weights.zip.XXXXXXXX.part`` files, ``checkpoints/.step-*`` temp folders, and ``.qzp-data-*`` dataset
  extraction folders of processes that no longer run. Those folders live in the output folder (not in the
  system temp folder), so if anything survives, it is where the user looks.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = ".qzp-train.lock"
DATA_PREFIX = ".qzp-data-"
PROBE_BYTES = 1 << 20
_PART = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.part$")  # tempfile.mkstemp names, see archive._mkstemp_for
_DATA_DIR = re.compile(r"^\.qzp-data-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


class OutputError(RuntimeError):
    """The output folder cannot be written, or another training is writing to it."""


def probe_writable(folder: Path, what: str = "output folder") -> None:
    """Create ``folder`` and write, fsync and delete a 1 MiB probe file in it; refuse with one clear message."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{what} {folder} cannot be created: {e.strerror or e}") from e
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qzp-probe-", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise OutputError(_why_unwritable(folder, what, e)) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _why_unwritable(folder: Path, what: str, e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f" ({shutil.disk_usage(folder).free >> 20} MiB free)"
        except OSError:
            free = ""
        return f"{what} {folder} is on a full disk{free}: {e.strerror}; free some space or choose another output"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{what} {folder} is not writable ({e.strerror}); choose a folder you can write to"
    return f"{what} {folder} cannot be written: {e.strerror or e}"


# ---- the lock -----------------------------------------------------------------------------------------


def _flock(fd: int) -> bool:
    """Take an exclusive non-blocking OS lock on ``fd``; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        os.lseek(fd, 1 << 20, os.SEEK_SET)  # lock a byte past the text, so others can still read who holds it
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}, writing "
                f"{info.get('archive')}")
    except (OSError, ValueError, AttributeError):
        return "a process that has not written its details yet"


class RunLock:
    """Exclusive locks on the output folder(s) of one training run (see the module docstring)."""

    def __init__(self, folders: list[Path], archive: Path):
        self.archive = Path(archive)
        self.paths = list(dict.fromkeys(Path(f).resolve() / LOCK_NAME for f in folders))
        self._fds: list[tuple[Path, int]] = []

    def acquire(self) -> RunLock:
        try:
            for path in self.paths:
                self._fds.append((path, self._acquire_one(path)))
        except BaseException:
            self.release()
            raise
        return self

    def _acquire_one(self, path: Path) -> int:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "archive": str(self.archive),
                "started": _dt.datetime.now().astimezone().replace(microsecond=0).isoformat()}
        for _ in range(5):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                locked = _flock(fd)
            except OSError as e:  # a file system without locks (some network mounts)
                os.close(fd)
                raise OutputError(f"cannot lock {path} ({e.strerror}); this file system does not support file locks, "
                                  "use an output folder on a local disk") from e
            if not locked:
                os.close(fd)
                raise OutputError(
                    f"output folder {path.parent} is in use by another training ({_holder(path)}); wait for it to "
                    f"finish or choose another --output / --output-dir. If no such training runs, delete {path}"
                )
            try:  # the holder may have released and deleted the file between our open and our lock: retry
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stale = os.fstat(fd).st_size > 0
            if stale:
                logger.info("taking over %s, left by a run that ended without releasing it (%s)", path, _holder(path))
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            return fd
        raise OutputError(f"could not lock {path}: it kept changing; is another training starting on this output?")

    def release(self) -> None:
        while self._fds:
            path, fd = self._fds.pop()
            try:
                path.unlink(missing_ok=True)  # while still holding the lock: see the inode check above
            except OSError as e:
                logger.warning("could not remove the lock file %s: %s", path, e)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- leftovers ---------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no safe liveness probe here: leave the folder (it is in the output folder, visible)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_data_dir(output_dir: Path) -> Path:
    """A folder for the extracted dataset inside ``output_dir``, named after this host and process."""
    return Path(tempfile.mkdtemp(prefix=f"{DATA_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=output_dir))


def clean_leftovers(output_dir: Path, archive: Path) -> list[Path]:
    """Remove what a killed run left in ``output_dir`` and beside ``archive`` (call holding :class:`RunLock`)."""
    output_dir, archive = Path(output_dir), Path(archive)
    ours = {archive.name, archive.stem + "_loss.png"}
    removed: list[Path] = []
    for folder in dict.fromkeys((output_dir, archive.parent)):
        for p in folder.glob(".*.part") if folder.is_dir() else []:
            m = _PART.match(p.name)
            if m and m["name"] in ours and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    host = socket.gethostname()
    for p in output_dir.glob(f"{DATA_PREFIX}*") if output_dir.is_dir() else []:
        m = _DATA_DIR.match(p.name)
        if m and p.is_dir() and m["host"] == host and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    ckroot = output_dir / "checkpoints"
    for p in ckroot.glob(".step-*") if ckroot.is_dir() else []:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        logger.info("removed %d leftover(s) of an interrupted run: %s", len(removed), ", ".join(p.name for p in removed))
    return removed

"""Output directories written whole or not at all, never at the expense of the user's files.

A run reserves its output before any work: it creates a staging folder ``.<name>.cfsp-tmp`` beside
the output. That one folder

- is a lock: ``mkdir`` is atomic, so a second run into the same output fails at once instead of
  silently replacing the first run's result;
- proves up front that the location is writable (not under a regular file, not read-only), before
  minutes of calibration;
- records its owner (host, pid, process start), so a folder left by a killed run (``kill -9``,
  power loss) is recognised and removed by the next run into the same parent.

The result is written to ``<staging>/new`` and published by one rename: onto a free path with
no-replace semantics, or, with ``overwrite``, by an atomic exchange with the old directory (Linux
``renameat2(RENAME_EXCHANGE)``; elsewhere two renames whose midpoint the next run repairs). A
crash at any moment leaves the old or the new directory in place, never neither.

``overwrite`` replaces only a directory that cfsp wrote (it holds ``pruning_plan.json``), and no
output may be the input model, the working directory or a parent of either. SIGTERM and SIGHUP
(what ``timeout``, ``docker stop`` and schedulers send) are turned into an exception while a
reservation is held, so they clean up like Ctrl-C does.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from cfsp.errors import CfspError, Terminated

PLAN_FILE = "pruning_plan.json"  # what marks a directory as cfsp's own output
STAGING_SUFFIX = ".cfsp-tmp"
OWNER_FILE = "owner.json"
_ORPHAN_AGE_S = 60.0  # a staging folder without an owner file older than this is a crash leftover
log = logging.getLogger("cfsp")


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def check_output(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
    own_file: Callable[[Path], bool] | None = None,
) -> Path:
    """Validate an output path without writing anything; returns it resolved.

    Refused: a regular file; a location under a file or without write permission; the working
    directory, ``protect`` (the inputs) or a parent of any of them; a non-empty directory unless
    ``overwrite``, and even then one that cfsp did not write. With ``own_file`` the output is a
    single file instead, and ``own_file(path)`` tells whether an existing one is cfsp's to replace.
    """
    out = Path(out_dir).expanduser().resolve()
    for guarded in [Path.cwd(), *(Path(p).expanduser().resolve() for p in protect)]:
        if out == guarded or out in guarded.parents:
            what = "the current directory" if guarded == Path.cwd() else f"the input {guarded}"
            raise CfspError(
                f"refusing to write to {out}: it is {what} or a parent of it; choose another --out"
            )
    if own_file is not None:
        _check_own_file(out, overwrite, own_file)
    elif out.exists() and not out.is_dir():
        raise CfspError(f"output path {out} is an existing file; choose a directory path for --out")
    elif out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CfspError(f"output directory {out} is not empty; choose another path or pass --overwrite")
        if not (out / PLAN_FILE).is_file():
            raise CfspError(
                f"refusing to overwrite {out}: it was not written by cfsp (no {PLAN_FILE}); "
                "--overwrite only replaces cfsp output, choose another --out"
            )
    _check_location(out, "--out")
    return out


def _check_own_file(out: Path, overwrite: bool, own_file: Callable[[Path], bool]) -> None:
    if out.is_dir():
        raise CfspError(f"output path {out} is a directory; give a file name for --out")
    if out.exists():
        if not overwrite:
            raise CfspError(f"output file {out} exists; choose another path or pass --overwrite")
        if not own_file(out):
            raise CfspError(
                f"refusing to overwrite {out}: it was not written by cfsp; "
                "--overwrite only replaces cfsp output, choose another --out"
            )


def _check_location(target: Path, option: str) -> None:
    """The nearest existing ancestor of ``target`` must be a writable directory."""
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CfspError(f"cannot create {target}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CfspError(f"cannot write to {existing} (permission denied); choose another {option}")


# --------------------------------------------------------------------------- owners and leftovers


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), so a reused pid is not mistaken for the owner."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_record() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid), "time": time.time()}


def _owner_alive(owner: dict) -> bool:
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user: alive
    start = owner.get("start")
    return start is None or _process_start(pid) in (None, start)


def _read_owner(staging: Path) -> dict | None:
    try:
        return json.loads((staging / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_stale(staging: Path) -> tuple[bool, str, bool]:
    """Whether a staging folder was left by a dead run, who owned it, and whether on another host."""
    owner = _read_owner(staging)
    if owner is None:  # killed between creating the folder and writing its owner file
        try:
            age = time.time() - staging.stat().st_mtime
        except OSError:
            return False, "unknown owner", False
        return age > _ORPHAN_AGE_S, "unknown owner", False
    who = f"pid {owner.get('pid')} on {owner.get('host')}"
    if owner.get("host") != socket.gethostname():
        return False, who, True
    return not _owner_alive(owner), who, False


def clean_stale(parent: Path) -> list[Path]:
    """Remove the staging folders that killed runs left in ``parent``; returns what was removed.

    A run killed between the two renames of a non-atomic overwrite left the old directory in
    ``<staging>/old``: it is moved back first. Folders of runs on other hosts are only named.
    """
    removed = []
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(STAGING_SUFFIX)]
    except OSError:
        return removed
    for staging in entries:
        if not staging.is_dir() or staging.is_symlink():
            continue
        stale, who, foreign = _is_stale(staging)
        if not stale:
            if foreign:
                log.warning(
                    f"found {staging} of a run on another host ({who}); remove it if that run is over"
                )
            continue
        target = parent / staging.name[1 : -len(STAGING_SUFFIX)]
        old = staging / "old"
        if old.exists() and not target.exists():
            os.rename(old, target)
            log.warning(f"restored {target} from an interrupted overwrite ({who})")
        shutil.rmtree(staging, ignore_errors=True)
        log.warning(f"removed {staging}, left behind by a killed run ({who})")
        removed.append(staging)
    return removed


# --------------------------------------------------------------------------- atomic renames

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the call or the flag is not supported (then fall back)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), ctypes.c_uint(flags))
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _publish_new(source: Path, target: Path) -> None:
    """Move ``source`` to a ``target`` that must not exist (or be an empty directory)."""
    try:
        if not _renameat2(source, target, _RENAME_NOREPLACE):
            os.rename(source, target)  # POSIX: fails on a non-empty directory, replaces an empty one
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise CfspError(
                f"{target} was written by another run meanwhile; choose another --out or pass --overwrite"
            ) from None
        raise


def _exchange(source: Path, target: Path, staging: Path) -> None:
    """Swap ``source`` into ``target``; the old directory ends up at ``source``'s path or in staging."""
    if _renameat2(source, target, _RENAME_EXCHANGE):
        return
    old = staging / "old"
    os.rename(target, old)  # a crash right here is repaired by clean_stale: old goes back
    try:
        os.rename(source, target)
    except BaseException:
        os.rename(old, target)
        raise


def _current_umask() -> int:
    """The process umask (read from /proc on Linux, where setting it to read it could race)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Give every file the mode a plain ``open`` would have given it.

    Some writers (safetensors via a temporary file) create 0600 files; a serving process under
    another user must be able to read the output, like any other tool's.
    """
    mask = _current_umask()
    if not folder.is_dir():
        os.chmod(folder, 0o666 & ~mask)
        return
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


# --------------------------------------------------------------------------- the reservation


def _raise_terminated(signum, _frame):
    raise Terminated(signum)


class StagedOutput:
    """Reserve ``out`` now, write into ``with StagedOutput(out) as folder:``, publish on success.

    On any exception (Ctrl-C, SIGTERM and SIGHUP included) the staging folder and any parent
    directories this reservation created are removed, and ``out`` is as it was. With ``own_file``
    (see ``check_output``) the output is one file: the context gives the path to write it to.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        overwrite: bool = False,
        protect: Iterable[str | os.PathLike] = (),
        own_file: Callable[[Path], bool] | None = None,
    ) -> None:
        self.overwrite = overwrite
        self.own_file = own_file
        self.out = check_output(out_dir, overwrite, protect, own_file)
        self.staging = staging_path(self.out)
        self.folder = self.staging / "new"
        self._created: list[Path] = []
        self._signals: dict[int, object] = {}
        self._held = False

    def __enter__(self) -> Path:
        self._catch_signals()
        try:
            self._make_parents()
            clean_stale(self.out.parent)
            self._lock()
            if self.own_file is None:
                os.mkdir(self.folder)
        except BaseException:
            self._release(failed=True)
            raise
        return self.folder

    def __exit__(self, exc_type, exc, tb) -> None:
        failed = exc_type is not None
        try:
            if not failed:
                self._publish()
        except BaseException:
            failed = True
            raise
        finally:
            self._release(failed)

    def _make_parents(self) -> None:
        missing = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        for parent in reversed(missing):
            try:
                os.mkdir(parent)
            except FileExistsError:
                continue
            except OSError as exc:
                raise CfspError(f"cannot create {parent}: {exc.strerror}; choose another --out") from None
            self._created.append(parent)

    def _lock(self) -> None:
        for _ in range(2):
            try:
                os.mkdir(self.staging)
            except FileExistsError:
                stale, who, _ = _is_stale(self.staging)
                if not stale:
                    raise CfspError(
                        f"another cfsp run ({who}) is writing {self.out}; wait for it or choose another --out"
                    ) from None
                clean_stale(self.out.parent)
                continue
            except OSError as exc:
                raise CfspError(
                    f"cannot write next to {self.out}: {exc.strerror}; choose another --out"
                ) from None
            self._held = True
            (self.staging / OWNER_FILE).write_text(json.dumps(_owner_record()), encoding="utf-8")
            return
        raise CfspError(f"could not reserve {self.out}: {self.staging} keeps reappearing; remove it by hand")

    def _publish(self) -> None:
        if not self.folder.exists():
            raise CfspError(f"nothing was written for {self.out}")
        _apply_umask(self.folder)
        if self.own_file is not None:
            if self.out.exists():
                _check_own_file(self.out, self.overwrite, self.own_file)
                _exchange(self.folder, self.out, self.staging)
            else:
                _publish_new(self.folder, self.out)
        elif self.out.is_dir() and any(self.out.iterdir()):
            if not self.overwrite:
                raise CfspError(
                    f"{self.out} was written by another run meanwhile; choose another --out or pass --overwrite"
                )
            if not (self.out / PLAN_FILE).is_file():
                raise CfspError(
                    f"refusing to overwrite {self.out}: it was not written by cfsp (no {PLAN_FILE})"
                )
            _exchange(self.folder, self.out, self.staging)
        else:
            _publish_new(self.folder, self.out)

    def _release(self, failed: bool) -> None:
        try:
            if self._held:
                shutil.rmtree(self.staging, ignore_errors=True)
                self._held = False
            if failed:
                for parent in reversed(self._created):
                    try:
                        parent.rmdir()
                    except OSError:
                        break
        finally:
            self._restore_signals()

    def _catch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
                self._signals[sig] = signal.signal(sig, _raise_terminated)

    def _restore_signals(self) -> None:
        for sig, handler in self._signals.items():
            signal.signal(sig, handler)
        self._signals.clear()


# --------------------------------------------------------------------------- single files


def json_safe(value):
    """``value`` with every NaN / inf float replaced by None: strict JSON readers reject NaN."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def dumps(payload, indent: int | None = 2) -> str:
    """Strict JSON text (no NaN), with ``str`` for anything JSON has no type for."""
    return json.dumps(json_safe(payload), indent=indent, default=str, allow_nan=False) + "\n"


def check_report_path(path: str | os.PathLike | None) -> None:
    """Fail before any work if a report file could not be written at ``path``."""
    if path is None:
        return
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise CfspError(f"{target} is a directory; give a file name for --output")
    _check_location(target, "--output")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a file by rename, so a reader (or a crash) never sees half of it."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}{STAGING_SUFFIX}")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target

"""Writer locks: one writer at a time per rank of a run (issue 27). `store.rundir` takes them.

Two writers appending to one run at once both read the manifest, hand out the same
`seq_id`s, and the last manifest write wins: duplicate keys and a lost count. So every
writer (`rs.record`, `routescope profile`, calibration, the importers) takes the lock of
its rank before it reads the manifest and lets it go after its last manifest write. The
ranks of one distributed job each lock their own fragment (`RUN/.lock` for rank 0, as
`manifest.json`; `RUN/.lock.rank=R` beside `manifest.rank=R.json`), so they never wait on
each other; a second process on the same rank gets `RunBusyError` naming the holder, or
waits (`wait=`).

Mechanism (`FileLock`): the lock file holds the holder's pid, host, rank, start time and
command as JSON, and the holder keeps an exclusive `flock(2)` on it. The kernel drops a
flock when its process ends, however it ends (SIGKILL, OOM killer), so a dead writer's
lock is recognised without guessing from pids: the next writer gets the flock, finds the
dead holder's details still in the file, warns, and takes over. A clean release deletes
the file while still holding the flock; a waiter that then wins the flock on the deleted
file sees that the path no longer names its inode and tries again.

Where `flock` is refused (some network or FUSE filesystems), `ExclusiveFileLock` creates
the file with O_CREAT|O_EXCL instead, and a lock whose pid is gone on this host is stale.

The interface is `RunLock` (acquire / release / holder) and `lock_for`, which picks the
implementation for a location: an object-storage run adds one class with the same three
methods (a conditional put of the lock object, If-None-Match: *, with a lease the holder
renews and a successor may take over once it expires) and one branch in `lock_for`.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from routescope.errors import RunBusyError

try:
    import fcntl
except ImportError:  # Windows: no flock, the O_EXCL lock serves
    fcntl = None  # type: ignore[assignment]

# Seconds between tries while waiting for a busy lock.
POLL_SECONDS = 0.2
# ExclusiveFileLock: a lock file still without details after this long is a dead writer's.
EMPTY_LOCK_SECONDS = 60.0
# flock refused by the filesystem: fall back to ExclusiveFileLock.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a run's lock: written into the lock file as JSON."""

    pid: int
    host: str
    rank: int = 0
    started_at: str = field(default_factory=_now)
    command: str = ""
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def this_process(cls, rank: int = 0) -> LockHolder:
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        return cls(pid=os.getpid(), host=socket.gethostname(), rank=rank, command=command[:200])

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder a lock file names; None for an empty or unreadable file."""
        try:
            data = json.loads(text)
            return cls(
                pid=int(data["pid"]),
                host=str(data["host"]),
                rank=int(data.get("rank", 0)),
                started_at=str(data.get("started_at", "")),
                command=str(data.get("command", "")),
                token=str(data.get("token", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        command = f", command {self.command!r}" if self.command else ""
        return f"pid {self.pid} on {self.host} (rank {self.rank}, since {self.started_at}{command})"

    def is_gone(self) -> bool:
        """True only when the holder was on this host and its pid no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False


class RunLock(Protocol):
    """What rundir needs from a lock; one implementation per kind of storage."""

    path: Path

    def acquire(self, wait: bool | float = False) -> LockHolder | None:
        """Take the lock; returns the dead holder taken over (None if it was free).

        `wait`: False fails at once with RunBusyError; True waits as long as it takes; a
        number waits that many seconds, then fails."""
        ...

    def release(self) -> None:
        """Let the lock go (nothing if not held)."""
        ...

    def holder(self) -> LockHolder | None:
        """The holder the lock names now (perhaps a dead one), or None."""
        ...


def _deadline(wait: bool | float) -> float | None:
    """Monotonic time after which a busy lock fails; None: wait forever."""
    if wait is True:
        return None
    seconds = 0.0 if wait is False or wait is None else float(wait)
    if seconds < 0:
        raise ValueError(f"wait={wait!r} is not allowed: give False, True or a number of seconds >= 0")
    return time.monotonic() + seconds


def _busy(path: Path, holder: LockHolder | None, waited: bool) -> RunBusyError:
    who = holder.describe() if holder else "another writer (it has not written its details yet)"
    after = " after waiting" if waited else ""
    return RunBusyError(
        f"{path.parent} is being written by {who}{after}; two writers would repeat sequence ids and "
        f"lose counts. Wait for it (rs.record(..., wait=True), CLI --wait), or if that process is gone "
        f"on another machine, delete {path}",
        holder=holder,
        lock_path=path,
    )


def acquire_announced(lock: RunLock, wait: bool | float, where: str) -> LockHolder | None:
    """`lock.acquire(wait)`, but a writer that has to wait says so first, once, naming the holder
    (a RuntimeWarning: the CLI prints it as one line, `--wait` is no longer silent)."""
    if wait is False or wait is None:
        return lock.acquire(False)
    _deadline(wait)  # a bad value fails before anything else
    try:
        return lock.acquire(False)
    except RunBusyError as busy:
        holder = busy.holder
        who = holder.describe() if holder else "another writer"
        how_long = "as long as it takes" if wait is True else f"up to {float(wait):g} s"
        warnings.warn(
            f"routescope: {where} is being written by {who}; waiting for it ({how_long})",
            RuntimeWarning,
            stacklevel=3,
        )
    return lock.acquire(wait)


def _warn_taken_over(path: Path, previous: LockHolder, why: str) -> None:
    warnings.warn(
        f"routescope: took over the lock of {path.parent} from {previous.describe()}, {why}",
        RuntimeWarning,
        stacklevel=4,
    )


def _read(path: Path) -> LockHolder | None:
    try:
        return LockHolder.parse(path.read_text(encoding="utf-8"))
    except OSError:
        return None


class FileLock:
    """A lock file held with flock(2); see the module docstring."""

    def __init__(self, path: str | Path, rank: int = 0) -> None:
        self.path = Path(path)
        self.rank = rank
        self.me: LockHolder | None = None
        self._fd: int | None = None
        self._fallback: ExclusiveFileLock | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None or (self._fallback is not None and self._fallback.held)

    def holder(self) -> LockHolder | None:
        return _read(self.path)

    def acquire(self, wait: bool | float = False) -> LockHolder | None:
        if self.held:
            return None
        deadline = _deadline(wait)
        while True:
            try:
                taken, previous = self._try()
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
                self._fallback = ExclusiveFileLock(self.path, self.rank)
                previous = self._fallback.acquire(
                    wait=max(0.0, deadline - time.monotonic()) if deadline else True
                )
                self.me = self._fallback.me
                return previous
            if taken:
                if previous is not None:
                    _warn_taken_over(self.path, previous, "which ended without releasing it")
                return previous
            if deadline is not None and time.monotonic() >= deadline:
                raise _busy(self.path, self._named_holder(), waited=wait not in (False, 0, 0.0))
            time.sleep(POLL_SECONDS)

    def _named_holder(self, patience: float = 1.0) -> LockHolder | None:
        """The holder, given a moment to write its details: a writer that has just won the
        flock writes them right after, and the error should name it."""
        until = time.monotonic() + patience
        while (holder := self.holder()) is None and time.monotonic() < until:
            time.sleep(0.02)
        return holder

    def _try(self) -> tuple[bool, LockHolder | None]:
        """One attempt: (taken, dead holder found in the file)."""
        if fcntl is None:
            raise OSError(errno.ENOSYS, "flock is not available")
        try:
            fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(self.path, os.O_RDWR), False
            except FileNotFoundError:
                return False, None  # released between the two opens: try again
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False, None
            except OSError as exc:
                if created and exc.errno in _NO_FLOCK:
                    # flock refused here: leave no empty file for the O_EXCL fallback to trip on
                    self.path.unlink(missing_ok=True)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (deleted) it between our open and our flock
                os.close(fd)
                return False, None
            previous = LockHolder.parse(os.read(fd, 1 << 16).decode("utf-8", "replace"))
            self.me = LockHolder.this_process(self.rank)
            os.ftruncate(fd, 0)
            os.pwrite(fd, self.me.dumps().encode("utf-8"), 0)
            os.fsync(fd)
        except BaseException:
            if self._fd != fd:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        self._fd = fd
        return True, previous

    def release(self) -> None:
        if self._fallback is not None:
            self._fallback.release()
            self._fallback = None
            return
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self.path.unlink()  # while the flock is still ours: no one else can be writing it
        except OSError:
            pass
        finally:
            os.close(fd)  # closing drops the flock


class ExclusiveFileLock:
    """Fallback where flock is refused: the lock exists while the file exists (O_CREAT|O_EXCL).

    A lock whose holder was on this host and whose pid is gone is stale: it is moved aside
    under a unique name (one rename, so of two successors only one moves it) and re-made.
    A holder on another host cannot be checked: the error names the file to delete."""

    def __init__(self, path: str | Path, rank: int = 0) -> None:
        self.path = Path(path)
        self.rank = rank
        self.me: LockHolder | None = None

    @property
    def held(self) -> bool:
        return self.me is not None

    def holder(self) -> LockHolder | None:
        return _read(self.path)

    def acquire(self, wait: bool | float = False) -> LockHolder | None:
        if self.held:
            return None
        deadline = _deadline(wait)
        previous: LockHolder | None = None
        while True:
            me = LockHolder.this_process(self.rank)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.holder()
                if self._is_stale(holder) and self._move_aside(holder):
                    previous = holder
                    continue
            else:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(me.dumps())
                    fh.flush()
                    os.fsync(fh.fileno())
                self.me = me
                if previous is not None:
                    _warn_taken_over(self.path, previous, "which is no longer running")
                return previous
            if deadline is not None and time.monotonic() >= deadline:
                raise _busy(self.path, self.holder(), waited=wait not in (False, 0, 0.0))
            time.sleep(POLL_SECONDS)

    def _is_stale(self, holder: LockHolder | None) -> bool:
        if holder is not None:
            return holder.is_gone()
        try:  # no details: its writer died between creating and filling it, or is filling it now
            return time.time() - self.path.stat().st_mtime > EMPTY_LOCK_SECONDS
        except FileNotFoundError:
            return False

    def _move_aside(self, stale: LockHolder | None) -> bool:
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another successor moved it first
        moved = _read(aside)
        if moved is not None and (stale is None or moved.token != stale.token):
            # a successor re-made the lock between our read and our rename: give it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        if self.me is None:
            return
        if (holder := self.holder()) is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)
        self.me = None


def lock_for(path: str | Path, rank: int = 0) -> RunLock:
    """The lock implementation for a lock at `path` (a local or mounted file for now)."""
    return FileLock(path, rank)


def describe_lock(path: str | Path) -> dict[str, Any] | None:
    """The holder a lock file names, as a dict (None when there is no lock file)."""
    holder = _read(Path(path))
    return asdict(holder) if holder is not None else None

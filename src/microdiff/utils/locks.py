"""One writer per output folder: an exclusive ``flock`` on a lock file inside it.

The kernel drops the lock when its process ends, however it ends (kill -9 included), so a lock left by a
dead process is simply taken again; the lock file then still names the dead holder (a holder that ended
cleanly empties it), which is how the next run can say that it took a dead run's folder over.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from .errors import UserError


class FolderLock:
    """``with FolderLock(folder, ".lock", "training run") as lock``: refuse, in one line naming the holder,
    when another live process holds it. ``lock.took_over`` is what a dead holder's lock file said."""

    def __init__(self, folder: str | os.PathLike, name: str = ".lock", what: str = "run"):
        self.path = Path(folder) / name
        self.what = what
        self.file = None
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> "FolderLock":
        try:
            file = open(self.path, "a+")
        except OSError as err:
            raise UserError(f"--out {self.path.parent}: cannot write there ({err.strerror or err}); pass a folder "
                            "you can write to") from None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(self.path)
            file.close()
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(f"{self.path}: cannot lock the folder ({err.strerror}); pass another --out") from None
            who = (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                   if holder else "another process")
            raise UserError(f"--out {self.path.parent}: another {self.what} ({who}) is writing to this folder; "
                            "wait for it to finish, or pass another --out") from None
        previous = _read_holder(self.path)
        if previous and previous.get("pid") != os.getpid():
            self.took_over = previous
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()  # an empty lock file: the holder ended cleanly; a filled one: its process died
            self.file.flush()
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


__all__ = ["FolderLock"]

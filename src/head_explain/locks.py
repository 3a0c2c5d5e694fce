"""One run per outdir: a second `head-explain` into the same folder is refused."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from head_explain.errors import ConfigError

LOCK_NAME = ".head-explain.lock"


@contextlib.contextmanager
def outdir_lock(outdir: str | Path) -> Iterator[None]:
    """Hold `outdir` for one run: a second run into it is refused with one line.

    An fcntl lock on a hidden file: the kernel drops it when the process dies, so a
    killed run never blocks the next. The file (and an outdir made only for it) is
    removed on exit; after taking the lock we check that the file is still the one at
    the path, so a run that raced with that removal takes the lock again.
    """
    import fcntl

    path = Path(outdir)
    made = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"key 'outdir': '{outdir}' is in use by another head-explain run (pid {holder}); "
                "wait for it to finish or give another --outdir"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # removed by the run that held it: lock the new file
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        for folder in made:  # innermost first; only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()

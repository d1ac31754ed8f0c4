"""Atomic writes: everything is written to a temporary sibling and renamed into place when complete.

Readers see the old file (or folder) or the new one, never half of one, and an error or Ctrl-C midway
removes the temporary sibling.  Only a run killed outright (SIGKILL, the out-of-memory killer, a power cut)
cannot clean up after itself, and a half-written model is as large as the model.  So every temporary
sibling is named ``.NAME.tmp-HOST-PID-XXXX`` after the machine (host name, process id namespace) and the
process writing it, and before writing ``NAME`` again :func:`remove_stale` deletes the siblings of processes
of this machine that no longer run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def _machine() -> str:
    """Where this process's id means something: the host name and, on Linux, the process id namespace (two
    containers may share a host name and a folder, each with its own process ids)."""
    name = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
    try:
        return f"{name}.{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return name


_HOST = _machine()


def temp_prefix(target: Path) -> str:
    """The name prefix of this process's temporary siblings of ``target``."""
    return f".{target.name}.tmp-{_HOST}-{os.getpid()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, the call only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Delete the temporary siblings of ``target`` left by processes of this machine that have ended.

    Siblings of other machines (a shared file system) and of running processes are left alone.  Returns
    what was removed.  Only on POSIX, where asking whether a process exists changes nothing.
    """
    if os.name != "posix" or not target.parent.is_dir():
        return []
    head = f".{target.name}.tmp-{_HOST}-"
    removed = []
    for path in target.parent.iterdir():
        pid = path.name[len(head):].split("-", 1)[0] if path.name.startswith(head) else ""
        if not pid.isdigit() or _running(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.warning("removed %s, left half-written by an earlier run (process %s) that was killed", path, pid)
        removed.append(path)
    return removed


def umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_file(path: "str | os.PathLike", write) -> None:
    """``write(tmp)`` into a temporary sibling of ``path``, then rename it over ``path``.

    The file gets the mode of the one it replaces, or a new file's (``0o666`` less the umask): ``mkstemp``
    makes it readable by its owner only, and a results table is meant to be read by others too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~umask()
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # after writing: a writer may replace the file with one of its own (safetensors)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: "str | os.PathLike", text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    replace_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

"""Files: the one atomic writer, results rows appended as JSON lines, run metadata, the
cache root.

Every main appends its rows (built by `study.rows.new_row`) with `append_row`: one `write` on
an `O_APPEND` descriptor under an exclusive lock, so a killed run never leaves a partial line
and concurrent writers (sweep shards sharing a file) never interleave.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import subprocess
import tempfile
import uuid
from pathlib import Path

CACHE_ENV = "JDISTILL_CACHE"


def cache_dir(kind: str) -> Path:
    """Where cached work of `kind` (gguf, stages, traces, xla) lives:
    $JDISTILL_CACHE/KIND, default ~/.cache/jdistill/KIND. The one cache root."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jdistill") / kind


def portable_paths(obj, roots: dict | None = None):
    """`obj` (JSON-like) with every absolute path string made machine-independent: under a
    root it becomes NAME/relative (roots default: the cache root as $JDISTILL_CACHE, the
    installed packages as site-packages), elsewhere just its file name. For results that
    are published (a report folder committed or shared) rather than reread on this machine."""
    if roots is None:
        import sysconfig
        roots = {"$JDISTILL_CACHE": cache_dir(""), "site-packages": sysconfig.get_paths()["purelib"]}
    if isinstance(obj, dict):
        return {k: portable_paths(v, roots) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable_paths(v, roots) for v in obj]
    if not (isinstance(obj, str) and os.path.isabs(obj) and "\n" not in obj):
        return obj
    for name, root in roots.items():
        try:
            return str(Path(name) / Path(obj).relative_to(Path(root)))
        except ValueError:
            continue
    return Path(obj).name


def git_sha(cwd=None) -> str | None:
    """The checked-out commit of the code that ran (None outside a git checkout)."""
    here = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_metadata() -> dict:
    """Run id, git sha and UTC time: the first fields of every row."""
    return {"run_id": uuid.uuid4().hex[:12], "git_sha": git_sha(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def atomic_write_with(path, write) -> Path:
    """Calls `write(tmp_path)` on a temp file beside `path`, fsyncs it and renames it into
    place: a crash or an error leaves the old file or none, never half of the new one (and
    no temp file). The one atomic writer: every file a main produces goes through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write(path, data: str | bytes) -> Path:
    """Writes `data` (text as UTF-8) to `path` atomically (`atomic_write_with`)."""
    if not isinstance(data, (str, bytes)):
        raise TypeError(f"atomic_write takes str or bytes, got {type(data).__name__}")
    raw = data.encode() if isinstance(data, str) else data

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(raw)

    return atomic_write_with(path, write)


def atomic_write_json(path, obj, indent: int = 2) -> Path:
    """`obj` as JSON, atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent))


def append_row(path, row: dict) -> None:
    """Appends `row` as one JSON line, atomically with respect to crashes and other writers."""
    line = (json.dumps(row, sort_keys=False, allow_nan=True) + "\n").encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        written = os.write(fd, line)
        if written != len(line):  # a full disk: take the partial line back out
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(f"could not append a results row to {path} (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)

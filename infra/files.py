"""Where the checkout is, writing files so that no reader ever sees half of one, and activity logs."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` so that readers, in this or any process, see the old file or the whole new one,
    never a partial write: a temp file in the same folder, flushed to disk, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_json_line(path: Path, record: dict) -> None:
    """Append `record` as one JSON line to `path` (an activity log that tools can follow)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as log_file:
        log_file.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")


def read_json_lines(path: Path) -> list[dict]:
    """The records of an activity log; none when it does not exist yet."""
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []

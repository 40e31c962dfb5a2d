"""Where the checkout is, and writing files so that no reader ever sees half of one."""
from __future__ import annotations

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

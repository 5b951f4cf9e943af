"""Run-directory files, each written atomically (temporary file, then rename): a run killed at any
moment leaves every file either complete or absent."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def write_jsonl(path: Path, rows) -> None:
    _atomic_write(path, lambda f: f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_checkpoint(path: Path, state: dict) -> None:
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)

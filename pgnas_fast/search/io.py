"""Run-directory files written atomically (temporary file, then rename): a run killed at any moment
leaves each of them either complete or absent. The run's state (config, checkpoints, logs, results)
goes through here; the ranking progress logs are appended per chunk instead (a line cut by a kill is
skipped, rank.ProgressLog), and the report, its figures and the export's model files are written in
place, since they are made again from that state."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from ..data.errors import DataError
from ..interrupts import interrupts_deferred


class RunError(ValueError):
    """A run directory that cannot be used as asked (e.g. resuming with another config)."""


def changed_keys(started: dict, now: dict, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys whose value differs (or that one side lacks), in key order."""
    return [key for key in sorted({*started, *now})
            if key not in ignore and (key in started, started.get(key)) != (key in now, now.get(key))]


def changed_settings(started: dict, now: dict, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """'key old (now new)' for every changed key (changed_keys): what a refused resume names ('unset' for a
    key that one side lacks, e.g. racing's eta against an exhaustive ranking)."""
    def shown(settings: dict, key: str) -> str:
        return repr(settings[key]) if key in settings else "unset"

    return [f"{key} {shown(started, key)} (now {shown(now, key)})"
            for key in changed_keys(started, now, ignore=ignore)]


_held_lock_fds: set[int] = set()  # the descriptors of the writer locks this process holds


def _drop_held_locks() -> None:
    """In a forked child (a DataLoader worker): an flock belongs to the open file, which fork shares, so a
    worker that outlives its killed parent by seconds would keep the run locked and refuse an immediate
    --resume. The child's copies of the descriptors are pointed at /dev/null (closing them could close
    a number the child has reused by the time the copied file objects are collected)."""
    if _held_lock_fds:
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in _held_lock_fds:
            os.dup2(null, fd)
        os.close(null)
        _held_lock_fds.clear()


os.register_at_fork(after_in_child=_drop_held_locks)


def lock_is_held(directory: Path, what: str) -> bool:
    """Whether a process holds writer_lock(directory, what) now (a probe: takes and drops it if free)."""
    path = Path(directory) / f".{what}.lock"
    if not path.exists():
        return False
    with open(path, "a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def writer_lock(directory: Path, what: str, parallel):
    """Held for the block by the rank-0 process of the one command allowed to write `what` in
    `directory` (its file .WHAT.lock, an flock that dies with its process, not with the children it
    forks: _drop_held_locks): a second one, e.g. a resume started while a killed torchrun's workers
    still run (they outlive their launcher), is refused on every rank instead of interleaving its
    writes with theirs."""
    held = None
    if parallel.is_main:
        held = open(directory / f".{what}.lock", "a")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _held_lock_fds.add(held.fileno())
        except BlockingIOError:
            held.close()
            held = None
    if not all(parallel.all_gather([held is not None or not parallel.is_main])):
        raise RunError(f"another pgnas-fast process is writing {what} in {str(directory)!r}: wait for it to end, "
                       "or stop it (a killed torchrun leaves its worker processes running)")
    try:
        yield
    finally:
        if held is not None:
            _held_lock_fds.discard(held.fileno())
            held.close()


_TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}" + re.escape(_TEMPORARY_SUFFIX))  # mkstemp's name in _atomic_write


def remove_interrupted_writes(directory: Path) -> None:
    """Delete the temporaries of _atomic_write that a SIGKILL left in `directory` (any other exit removes its
    own; a SupNet-M checkpoint's is 210 MB). Call with the writer lock of what writes there held."""
    for path in Path(directory).glob(".*" + _TEMPORARY_SUFFIX):
        if _TEMPORARY.fullmatch(path.name):
            path.unlink(missing_ok=True)


@functools.cache
def _file_mode() -> int:
    """The mode open() gives a new file (0o666 less the umask): mkstemp's own 0o600 would hide a run's
    results from the other users who can read its report."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    with interrupts_deferred():  # (a torch.save cut mid-file: see interrupts.py)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX)
        try:
            os.fchmod(fd, _file_mode())
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# the search's own ranking progress logs (guided candidates, random baseline): `rank --tag` may not name them
SEARCH_RANKINGS = {"guided": "rank-search", "random": "rank-search-random"}
# {"data_dir": absolute path, "fingerprint": data_fingerprint's digest} of a run (or an export) that read its
# data from --data-dir
DATA_FILE = "data.json"
# an export directory's (`export`, `train`) files that no run directory holds
EXPORT_FILES = ("export.json", "candidate-checkpoint.pt")


def export_file_in(directory: Path) -> str | None:
    """The first of EXPORT_FILES in `directory` (an export or training directory, not a run); None: none."""
    return next((name for name in EXPORT_FILES if (directory / name).exists()), None)


def _data_record(directory: Path) -> dict | None:
    """The directory's data.json, None when it has none; a malformed one is named."""
    path = Path(directory) / DATA_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record["data_dir"], str):
            raise TypeError("not an object with a data_dir string")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise RunError(f"{str(path)!r} is malformed ({type(err).__name__}: {err}): it names the data directory the "
                       "run was made with; restore it, or pass --data-dir") from None
    return record


def data_dir_of(directory: Path, data_dir) -> str | Path | None:
    """`data_dir` if given, else the one a run (or an export of it) was made with, else None: the
    commands that read a run again need no second --data-dir."""
    if data_dir is not None:
        return data_dir
    record = _data_record(directory)
    if record is not None and not Path(record["data_dir"]).is_dir():
        raise DataError(f"the data directory {str(directory)!r} was made with, {record['data_dir']!r}, does not "
                        "exist: if the data moved, pass --data-dir where it is now")
    return None if record is None else record["data_dir"]


def other_data_note(directory: Path, data_dir) -> str | None:
    """For an error in reading `data_dir` with the config of `directory`, when `directory` was made with
    the data of another directory: the advice of a data error (e.g. "lower heldout_size") may not apply,
    as the split is the run's."""
    record = _data_record(directory)
    if record is None or data_dir is None or Path(data_dir).resolve() == Path(record["data_dir"]).resolve():
        return None
    return (f"(--data-dir {str(data_dir)!r} is read with the config of {str(directory)!r}, made with the data under "
            f"{record['data_dir']!r}: is it that data set?)")


def write_data_record(directory: Path, data_dir, fingerprint: str) -> None:
    write_json(Path(directory) / DATA_FILE, {"data_dir": str(Path(data_dir).resolve()), "fingerprint": fingerprint})


def check_data_record(directory: Path, data_dir, fingerprint: str | None) -> None:
    """Refuse data other than the data a run (or an export) was made with: its held-out split, which ranks
    candidates, would be other images (a moved copy of the same data passes; records older than the
    fingerprint are not checked)."""
    record = _data_record(directory)
    if record is None or fingerprint is None or record.get("fingerprint") in (None, fingerprint):
        return
    raise RunError(f"the data under {str(data_dir)!r} is not the data {str(directory)!r} was made with (from "
                   f"{record['data_dir']!r}; {DATA_FILE} holds its fingerprint): its splits would be other images. "
                   "Pass that data set's --data-dir, or leave --data-dir out to use the recorded one")


def write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def write_jsonl(path: Path, rows) -> None:
    _atomic_write(path, lambda f: f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()))


def read_json_object(path: Path) -> dict | None:
    """The JSON object in `path`; None when it is missing, unreadable or not an object (a file still being
    written, or damaged)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def complete_lines(path: Path) -> int:
    """The rows of an appended log (a training log, a ranking's progress log) that were written whole: a
    line cut by a kill is none; a missing file has none."""
    try:
        with open(path, "rb") as log:
            return sum(1 for line in log if line.endswith(b"\n"))
    except OSError:
        return 0


def save_checkpoint(path: Path, state: dict) -> None:
    _atomic_write(path, lambda f: torch.save(_interned(state), f))


def _interned(obj):
    """`obj` with its strings interned. Pickle writes a string met twice once if it is one object and twice
    if it is two equal ones: the optimizer's settings keys ('lr', 'momentum', ... per parameter group) are
    shared literals in a fresh run and separate strings after a resume's load_state_dict, so without this
    a resumed run's checkpoints differ in bytes (not in content) from an uninterrupted run's."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {_interned(key): _interned(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_interned(item) for item in obj)
    return obj


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load fails in many ways on a cut or foreign file (zip, pickle, EOF)
        raise RunError(f"{str(path)!r} is not a readable checkpoint ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise RunError(f"{str(path)!r} is not a pgnas-fast checkpoint (no model state in it)")
    return state

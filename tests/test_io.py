"""The run directory's files (pgnas_fast.search.io), read and written directly: the settings a refused resume
names, the writer lock across a fork, atomic writes and what they leave, data.json, and the readers of damaged
or unfinished files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import namedtuple

import pytest
import torch

from pgnas_fast.search.io import (RunError, changed_settings, check_data_record, complete_lines, data_dir_of,
                                  load_checkpoint, other_data_note, read_json_object, read_jsonl,
                                  remove_interrupted_writes, save_checkpoint, write_data_record, write_json)

Best = namedtuple("Best", "epoch accuracy")  # (module level: pickle finds it by name)


# ---- the settings a refused resume names ----------------------------------------------------------
def test_changed_settings_names_a_key_either_side_lacks():
    """An exhaustive ranking resumed as a racing one: eta, which only the new settings hold, is named ('unset'
    on the side that lacks it), and so is a key recorded as None that the new settings no longer have."""
    started = {"strategy": "exhaustive", "candidates": 40, "checkpoint_epoch": None}
    now = {"strategy": "racing", "candidates": 40, "eta": 4}
    assert changed_settings(started, now) == ["checkpoint_epoch None (now unset)", "eta unset (now 4)",
                                              "strategy 'exhaustive' (now 'racing')"]
    assert changed_settings(now, started, ignore=("strategy",)) == ["checkpoint_epoch unset (now None)",
                                                                    "eta 4 (now unset)"]
    assert changed_settings(started, dict(started)) == []


# ---- the writer lock --------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists descriptors through /proc")
def test_a_released_writer_lock_leaves_a_later_fork_s_files_alone(tmp_path):
    """Once the lock is released its descriptor number is free for any file the process opens next: a child
    forked later (a DataLoader worker) reads that file, not /dev/null put in place of a lock it never held."""
    (tmp_path / "train_log.jsonl").write_text('{"epoch": 0}\n')
    script = f"""
import os
from pathlib import Path
from pgnas_fast.search.io import writer_lock
from pgnas_fast.search.parallel import SINGLE_PROCESS
directory = Path({str(tmp_path)!r})
lock = os.path.realpath(directory / ".search.lock")
with writer_lock(directory, "search", SINGLE_PROCESS):
    held = [int(fd) for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{{fd}}") == lock]
log = open(directory / "train_log.jsonl", "rb")
assert [log.fileno()] == held, (log.fileno(), held)  # the lock's number, free again, is the log's now
child = os.fork()
if child == 0:
    os._exit(0 if os.read(log.fileno(), 100) == b'{{"epoch": 0}}\\n' else 1)
_, status = os.waitpid(child, 0)
print("child read the log" if os.waitstatus_to_exitcode(status) == 0 else "child read something else")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child read the log"


# ---- atomic writes ----------------------------------------------------------------------------------
def test_only_the_temporaries_of_atomic_writes_are_removed(tmp_path):
    """mkstemp's names (.NAME. + 8 characters + .tmp) go, whatever made them; other files ending in .tmp stay."""
    fd, made = tempfile.mkstemp(dir=tmp_path, prefix=".summary.json.", suffix=".tmp")
    os.close(fd)
    cut = [made, tmp_path / ".checkpoint.pt.k2x_9abc.tmp", tmp_path / ".config.json.Zq81mmp0.tmp"]
    kept = [tmp_path / ".notes.backup_v2.tmp", tmp_path / ".summary.json.Zq81mmp0xy.tmp",
            tmp_path / ".checkpoint.pt.short.tmp", tmp_path / "draft.tmp", tmp_path / "checkpoint.pt"]
    for path in cut[1:] + kept:
        open(path, "wb").close()
    remove_interrupted_writes(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in kept)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    write_json(tmp_path / "summary.json", {"best": {"id": 1}})
    old = (tmp_path / "summary.json").read_bytes()
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(tmp_path / "summary.json", {"best": {"id": 2}, "model": torch.nn.Linear(2, 2)})
    with pytest.raises(Exception, match="pickle"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"model": {}, "schedule": lambda epoch: 0.1})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["summary.json"]
    assert (tmp_path / "summary.json").read_bytes() == old


def test_a_write_reaches_the_disk_before_it_takes_the_file_s_name(tmp_path, monkeypatch):
    """fsync of the whole new file, then the rename: a power cut leaves the old file or the new one whole, not a
    name pointing at data still in the page cache."""
    path = tmp_path / "summary.json"
    write_json(path, {"best": {"id": 1}})
    old = path.read_bytes()
    real_fsync, synced = os.fsync, []

    def fsync(fd):
        synced.append((os.fstat(fd).st_size, path.read_bytes()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_json(path, {"best": {"id": 2}})
    assert synced == [(len(path.read_bytes()), old)]  # the new bytes all written, the name still the old file's


def test_json_files_are_the_same_bytes_whatever_the_order_keys_were_set_in(tmp_path):
    """A resumed run builds its dicts in another order than an uninterrupted one: its files must not differ."""
    write_json(tmp_path / "a.json", {"seed": 3, "config": {"lr": 0.05, "epochs": 2}})
    write_json(tmp_path / "b.json", {"config": {"epochs": 2, "lr": 0.05}, "seed": 3})
    text = (tmp_path / "a.json").read_text()
    assert text == (tmp_path / "b.json").read_text()
    assert text == '{\n  "config": {\n    "epochs": 2,\n    "lr": 0.05\n  },\n  "seed": 3\n}\n'


def test_a_checkpoint_keeps_the_tuples_it_holds_with_their_types(tmp_path):
    """Strings are interned on the way out; a named tuple or a torch.Size comes back as itself."""
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "best": Best(epoch=3, accuracy=0.5),
             "shape": torch.Size([2, 3]), "groups": [("lr", 0.05), ("momentum", 0.9)]}
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    assert type(loaded["best"]) is Best and loaded["best"] == Best(3, 0.5)
    assert type(loaded["shape"]) is torch.Size and loaded["shape"] == (2, 3)
    assert loaded["groups"] == [("lr", 0.05), ("momentum", 0.9)]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


# ---- data.json --------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, error", [
    ('{"data_dir": 3, "fingerprint": "0123456789abcdef"}', "TypeError"),
    ('{"fingerprint": "0123456789abcdef"}', "KeyError"),
    ('["/data/imagenet"]', "TypeError"),
    ('{"data_dir": "/data/ima', "JSONDecodeError"),
])
def test_a_malformed_data_record_is_named(tmp_path, content, error):
    (tmp_path / "data.json").write_text(content)
    with pytest.raises(RunError, match=f"data.json' is malformed \\({error}.*restore it, or pass --data-dir"):
        data_dir_of(tmp_path, None)
    assert data_dir_of(tmp_path, tmp_path / "given") == tmp_path / "given"  # a given --data-dir does not read it


def test_the_data_record_compares_directories_not_spellings(tmp_path, monkeypatch):
    """data.json holds the absolute path; a relative or roundabout --data-dir of the same directory is that data,
    another directory gets the note."""
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    write_data_record(run, "data", "0123456789abcdef")
    assert json.loads((run / "data.json").read_text()) == {"data_dir": str(tmp_path.resolve() / "data"),
                                                           "fingerprint": "0123456789abcdef"}
    assert data_dir_of(run, None) == str(tmp_path.resolve() / "data")
    for same in ("data", "./data/", "run/../data", tmp_path / "data"):
        assert other_data_note(run, same) is None, same
    note = other_data_note(run, "other")
    assert note == (f"(--data-dir 'other' is read with the config of {str(run)!r}, made with the data under "
                    f"{str(tmp_path.resolve() / 'data')!r}: is it that data set?)")


def test_the_data_record_refuses_other_data_only_when_both_have_a_fingerprint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_data_record(run, tmp_path / "data", "0123456789abcdef")
    check_data_record(run, tmp_path / "moved", "0123456789abcdef")  # the same data, moved
    check_data_record(run, None, None)  # data with no fingerprint (the embedded digits): not checked
    with pytest.raises(RunError, match="is not the data .* its splits would be other images"):
        check_data_record(run, tmp_path / "other", "fedcba9876543210")
    (run / "data.json").write_text(json.dumps({"data_dir": str(tmp_path / "data")}))  # older than fingerprints
    check_data_record(run, tmp_path / "other", "fedcba9876543210")


# ---- readers of damaged or unfinished files ---------------------------------------------------------
def test_read_json_object_is_none_for_anything_but_a_whole_json_object(tmp_path):
    cases = {"missing.json": None, "cut.json": b'{"best": {"id"', "list.json": b"[1, 2]",
             "checkpoint-bytes.json": b"PK\x03\x04\x80\x04\x95\xff\xfe"}  # (a checkpoint written over it)
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        assert read_json_object(tmp_path / name) is None, name
    (tmp_path / "folder.json").mkdir()
    assert read_json_object(tmp_path / "folder.json") is None
    (tmp_path / "ok.json").write_text('{"best": {"id": 2}}')
    assert read_json_object(tmp_path / "ok.json") == {"best": {"id": 2}}


def test_read_jsonl_skips_blank_lines(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"id": 0, "score": 0.5}\n\n{"id": 1, "score": 0.25}\n  \n')
    assert read_jsonl(tmp_path / "rows.jsonl") == [{"id": 0, "score": 0.5}, {"id": 1, "score": 0.25}]


def test_complete_lines_counts_whole_rows_and_nothing_it_cannot_read(tmp_path):
    (tmp_path / "train_log.jsonl").write_bytes(b'{"epoch": 0}\n{"epoch": 1}\n{"epo')
    assert complete_lines(tmp_path / "train_log.jsonl") == 2
    assert complete_lines(tmp_path / "missing.jsonl") == 0
    (tmp_path / "progress-rank0.jsonl").mkdir()  # not a file: nothing read
    assert complete_lines(tmp_path / "progress-rank0.jsonl") == 0

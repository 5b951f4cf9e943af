"""The `pgnas-fast` command: a small search, doctor, and every bad input (one line, exit 2, nothing
written)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from pgnas_fast import configs
from pgnas_fast.cli import main

SMALL = ["--epochs", "1", "--candidates", "3", "--random-baseline", "2", "--quiet"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_search_prints_the_choice_and_the_run_directory(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--seed", "5", "--out", str(out))
    assert code == 0
    lines = stdout.strip().splitlines()
    arch = json.loads((out / "architecture.json").read_text())
    assert f"best candidate: {arch['candidate']} of 3" in stdout
    assert f"test accuracy {100 * arch['test_accuracy']:.2f}%" in stdout
    assert f"held-out accuracy {100 * arch['score']:.2f}%" in stdout
    assert lines[-1] == f"run directory: {out}"
    # the time line ends on the command's own time, at least its training and ranking
    summary = json.loads((out / "summary.json").read_text())
    whole = float(re.fullmatch(r"  time: training .*; this command ([0-9.]+) s", lines[-2])[1])
    assert whole >= round(summary["train_seconds"] + summary["rank_seconds"], 1) - 0.1
    assert arch["seed"] == 5
    assert "means over the first" not in stdout  # exhaustive: every candidate on every image


def test_search_under_racing_says_what_the_means_are_over(capsys, tmp_path):
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--set", "ranking=racing", "--out", str(tmp_path / "run"))
    assert code == 0 and "(means over the first 19 held-out images, which every candidate saw)" in stdout


def test_search_reads_overrides_from_a_config_file(capsys, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr": 0.02, "candidates": 2}))
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "search", "--epochs", "1", "--random-baseline", "0", "--quiet",
                              "--config", str(config), "--out", str(out))
    assert code == 0
    written = json.loads((out / "config.json").read_text())["config"]
    assert written["lr"] == 0.02 and written["candidates"] == 2 and written["epochs"] == 1
    assert "random gates" not in stdout


def test_a_run_s_config_json_is_a_config_file_for_its_preset(capsys, tmp_path):
    """A run's config.json ({"config": ..., "seed": ...}) passed back with --config gives the same resolved
    config (a rerun under another seed or --out); of another preset it is refused, naming it."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert run_cli(capsys, "search", *SMALL, "--set", "lr=0.02", "--out", str(first))[0] == 0
    code, _, _ = run_cli(capsys, "search", "--quiet", "--seed", "7", "--config", str(first / "config.json"),
                         "--out", str(again))
    assert code == 0
    written = [json.loads((d / "config.json").read_text()) for d in (first, again)]
    assert written[1]["config"] == written[0]["config"] and written[1]["seed"] == 7
    code, _, stderr = run_cli(capsys, "search", "--preset", "cifar10-supnet-m", "--config",
                              str(first / "config.json"), "--out", str(tmp_path / "other"))
    assert code == 2 and f"{str(first / 'config.json')!r} is a run's config.json of preset 'digits-tiny', not " \
                         "'cifar10-supnet-m': pass --preset digits-tiny" in stderr


def test_set_overrides_win_over_the_config_file(capsys, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr": 0.02}))
    out = tmp_path / "run"
    code, _, _ = run_cli(capsys, "search", *SMALL, "--config", str(config), "--set", "lr=0.03",
                         "--set", "milestones=[1]", "--set", "schedule=step", "--out", str(out))
    assert code == 0
    written = json.loads((out / "config.json").read_text())["config"]
    assert written["lr"] == 0.03 and written["milestones"] == [1] and written["schedule"] == "step"


def test_search_with_the_gaussian_posterior(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--posterior", "gaussian", "--set", "weight_reg=50",
                              "--set", "kl_warmup_epochs=5", "--out", str(out))
    assert code == 0
    # a concrete-family setting that the Gaussian KL does not read: said, not silently ignored
    assert "note: weight_reg set, but only the concrete family's regulariser reads it" in stdout
    assert stdout.startswith("pgnas-fast search: preset digits-tiny, posterior gaussian, seed 0,")
    assert json.loads((out / "config.json").read_text())["config"]["posterior"] == "gaussian"
    arch = json.loads((out / "architecture.json").read_text())
    assert arch["posterior"] == "gaussian" and f"best candidate: {arch['candidate']} of 3" in stdout
    assert "| posterior | gaussian: Gaussian variational dropout" in (out / "report.md").read_text()
    # a KL warm-up set longer than training: said, not silently cut
    epochs = json.loads((out / "config.json").read_text())["config"]["epochs"]
    assert (f"note: the regulariser's warm-up (kl_warmup_epochs 5) outlasts training ({epochs} epochs): it ends at "
            f"{epochs / 5:.0%} of its full weight") in stdout
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--out", str(tmp_path / "concrete"))
    assert code == 0 and "note:" not in stdout
    # the family's own warm-up is a share of the epochs asked for: no note
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--posterior", "gaussian", "--out", str(tmp_path / "own"))
    assert code == 0 and "note:" not in stdout
    assert json.loads((tmp_path / "own" / "config.json").read_text())["config"]["kl_warmup_epochs"] == 1 / 6


@pytest.mark.parametrize("posterior, epochs, warmup, reached", [
    ("gaussian", 2, 2, None),  # the warm-up ends with training: nothing to say
    ("gaussian", 3, 3.0, None),
    ("concrete", 4, 4, None),
    ("gaussian", 2, 1.5, None),
    ("gaussian", 4, 5, "80%"),  # it outlasts training: said, with the weight it reaches
    ("concrete", 1, 3, "33%"),
])
def test_the_kl_warm_up_note_is_printed_only_when_it_outlasts_training(capsys, monkeypatch, tmp_path, posterior,
                                                                      epochs, warmup, reached):
    """The note on a KL warm-up longer than training (kl_warmup_epochs > epochs, strictly): a warm-up
    as long as training gets none. (run_search is stubbed: the note is printed before it runs.)"""
    import types

    import pgnas_fast.search

    ran = []
    monkeypatch.setattr(pgnas_fast.search, "run_search",
                        lambda config, **kwargs: ran.append(config) or types.SimpleNamespace(is_main=False))
    for smoke in ([], ["--smoke"]):
        code, stdout, _ = run_cli(capsys, "search", "--epochs", str(epochs), "--posterior", posterior, "--quiet",
                                  "--set", f"kl_warmup_epochs={warmup}", *smoke, "--out", str(tmp_path / "run"))
        assert code == 0 and ran[-1]["kl_warmup_epochs"] == warmup and ran[-1]["epochs"] == epochs
        note = (f"note: the regulariser's warm-up (kl_warmup_epochs {warmup:g}) outlasts training ({epochs} epochs): "
                f"it ends at {reached} of its full weight (--set kl_warmup_epochs=N to change)")
        if reached is None or smoke:  # (a smoke check trains a few steps only: never said)
            assert "warm-up" not in stdout
        else:
            assert note in stdout.splitlines()


def test_overrides_that_do_not_do_what_they_seem_are_said(capsys, tmp_path):
    """--set supernet_args={...} replaces the preset's object whole: the keys it leaves out are named;
    amp=bf16 off CUDA trains in float32 (it was silently ignored)."""
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--set", 'supernet_args={"width": 8}', "--out", str(tmp_path))
    assert code == 0
    assert ("note: supernet_args replaces the preset's {'width': 16, 'gate_group_size': 4}: gate_group_size "
            "(preset: 4) now takes the super-network's default") in stdout
    assert json.loads((tmp_path / "config.json").read_text())["config"]["supernet_args"] == {"width": 8}
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--set", "amp=bf16", "--out", str(tmp_path / "amp"))
    assert code == 0 and "note: amp bf16 (autocast) applies on CUDA only: this run trains in float32" in stdout
    # one key of an object: the rest as the preset has it; a whole object after a --config's is said too
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--set", "supernet_args.width=8", "--out",
                              str(tmp_path / "one"))
    assert code == 0 and "note:" not in stdout
    assert json.loads((tmp_path / "one" / "config.json").read_text())["config"]["supernet_args"] == {
        "width": 8, "gate_group_size": 4}
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"supernet_args": {"width": 8, "gate_group_size": 2}}))
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--config", str(own), "--set", 'supernet_args={"width": 4}',
                              "--out", str(tmp_path / "whole"))
    assert code == 0 and ("note: --set supernet_args replaces the --config's {'width': 8, 'gate_group_size': 2}: "
                          "gate_group_size now takes the default (--set supernet_args.KEY=VALUE sets one key)"
                          ) in stdout


def test_set_assigns_whole_keys_and_single_keys_of_objects():
    """--set OBJECT.KEY=VALUE sets one key of supernet_args or data_args on top of the --config's object, else
    the preset's (none of the preset's data_args once the data set is another); later --set wins."""
    overrides = {"data_args": {"crop_scale": [0.5, 1]}}
    configs.apply_assignments(overrides, ["data_args.flip=false", "lr=0.1", "supernet_args.width=32"], "digits-tiny")
    assert overrides == {"data_args": {"crop_scale": [0.5, 1], "flip": False}, "lr": 0.1,
                         "supernet_args": {"width": 32, "gate_group_size": 4}}
    overrides = {}
    configs.apply_assignments(overrides, ["dataset=imagenet", "data_args.flip=false"], "digits-tiny")
    assert overrides == {"dataset": "imagenet", "data_args": {"flip": False}}  # (not the digits' test_size)
    overrides = {}
    notes = configs.apply_assignments(overrides, ["data_args.test_size=100", 'data_args={"test_size": 50}'],
                                      "digits-tiny")
    assert overrides == {"data_args": {"test_size": 50}} and notes == []  # (no key lost)
    # a whole object replacing what an earlier --set gave it, or a --config: the note says whose keys went
    overrides = {}
    notes = configs.apply_assignments(overrides, ["supernet_args.gate_group_size=2", 'supernet_args={"width": 4}'],
                                      "digits-tiny")
    assert overrides == {"supernet_args": {"width": 4}}
    assert notes == ["--set supernet_args replaces an earlier --set's {'width': 16, 'gate_group_size': 2}: "
                     "gate_group_size now takes the default (--set supernet_args.KEY=VALUE sets one key)"]
    notes = configs.apply_assignments({"data_args": {"test_size": 100, "heldout_size": 9}},
                                      ['data_args={"test_size": 50}'], "digits-tiny")
    assert notes == ["--set data_args replaces the --config's {'test_size': 100, 'heldout_size': 9}: heldout_size "
                     "now takes the default (--set data_args.KEY=VALUE sets one key)"]
    configs.apply_assignments(overrides, ["lr.x=1"], "digits-tiny")  # (not an object key: named by resolve)
    with pytest.raises(configs.ConfigError, match="unknown config key 'lr.x'"):
        configs.resolve("digits-tiny", overrides)


@pytest.mark.parametrize("command", ["study", "export", "evaluate", "info"])
def test_commands_that_do_not_shard_refuse_torchrun(capsys, monkeypatch, tmp_path, command):
    """Under torchrun every process would do all of it and write the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = {"study": [str(tmp_path)], "export": [str(tmp_path), "--out", str(tmp_path / "x")],
            "evaluate": [str(tmp_path)], "info": []}[command]
    code, _, stderr = run_cli(capsys, command, *argv)
    assert code == 2 and stderr == (f"pgnas-fast: error: {command} runs in one process (under torchrun every process "
                                    "would do all of it and write the same files); torchrun shares out search, "
                                    "rank and train\n")
    assert not (tmp_path / "x").exists()


def test_doctor_lists_every_backend(capsys):
    code, stdout, _ = run_cli(capsys, "doctor")
    assert code == 0
    for name in ("reference", "triton", "cuda", "cpu"):
        assert any(line.split()[:1] == [name] for line in stdout.splitlines()), name
    assert "torch" in stdout and "threads" in stdout
    import torch

    assert f"cpu kernels: {torch.backends.cpu.get_cpu_capability()} (" in stdout
    from pgnas_fast.ops import dispatch

    for name in ("cpu", "triton"):  # ops without a native kernel yet are named, not hidden
        if dispatch.missing_ops(name):
            assert f"runs on reference: {', '.join(dispatch.missing_ops(name))}" in stdout


def test_a_bad_backend_variable_is_named_by_doctor_and_search(capsys, monkeypatch, tmp_path):
    """doctor diagnoses it (it stopped halfway on a traceback); search names the variable, not a
    --backend flag that was not given."""
    monkeypatch.setenv("PGNAS_FAST_BACKEND", "bogus")
    code, stdout, _ = run_cli(capsys, "doctor")
    assert code == 0 and "backend selection: environment variable PGNAS_FAST_BACKEND must be one of" in stdout
    assert any(line.split()[:1] == ["cpu"] for line in stdout.splitlines())  # the report goes on
    code, _, stderr = run_cli(capsys, "search", "--out", str(tmp_path / "run"))
    assert code == 2 and stderr.startswith("pgnas-fast: error: environment variable PGNAS_FAST_BACKEND must be")
    code, _, stderr = run_cli(capsys, "search", "--backend", "reference", *SMALL, "--out", str(tmp_path / "run"))
    assert code == 0  # --backend wins over the variable


def _bad_config(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "unknown preset": (lambda t: ["--preset", "cifar99"], "unknown preset 'cifar99'"),
    "preset typo": (lambda t: ["--preset", "digits"], "unknown preset 'digits' (did you mean 'digits-tiny'?); known "
                                                      "presets: cifar10-supnet-e,"),
    "zero epochs": (lambda t: ["--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
    "negative candidates": (lambda t: ["--candidates", "-4"], "--candidates: must be an integer >= 1, got -4"),
    "non-integer candidates": (lambda t: ["--candidates", "many"], "--candidates: must be an integer"),
    "negative seed": (lambda t: ["--seed", "-1"], "--seed: must be an integer >= 0"),
    "seed too large": (lambda t: ["--seed", str(1 << 63)], "--seed: must be an integer < "),
    "missing config": (lambda t: ["--config", str(t / "nope.json")], "does not exist"),
    "config is a directory": (lambda t: ["--config", str(t)], "is not a file (a JSON object of preset keys)"),
    "autoaugment off CIFAR": (lambda t: ["--set", "autoaugment=true"],
                              "config key 'autoaugment' applies to CIFAR (the policy is AutoAugment's CIFAR one); "
                              "dataset digits takes false, got true"),
    "malformed config": (lambda t: ["--config", _bad_config(t, "{not json")], "is not valid JSON"),
    "config not an object": (lambda t: ["--config", _bad_config(t, "[1, 2]")], "must hold a JSON object"),
    "unknown config key": (lambda t: ["--config", _bad_config(t, '{"learning_rate": 1}')],
                           "unknown config key 'learning_rate'"),
    "config wrong type": (lambda t: ["--config", _bad_config(t, '{"epochs": "ten"}')],
                          "config key 'epochs' must be an int > 0, got 'ten'"),
    "config bool as int": (lambda t: ["--config", _bad_config(t, '{"candidates": true}')],
                           "config key 'candidates' must be an int in [1, 2^40]"),
    "too many candidates": (lambda t: ["--candidates", str((1 << 40) + 1)], "--candidates: must be an integer < "),
    "config out of range": (lambda t: ["--config", _bad_config(t, '{"p_init": 1.5}')],
                            "config key 'p_init' must be a number in (0, 1)"),
    "unknown posterior": (lambda t: ["--posterior", "bogus"],
                          "argument --posterior: invalid choice: 'bogus'"),
    "posterior in a config": (lambda t: ["--config", _bad_config(t, '{"posterior": "bernoulli"}')],
                              "config key 'posterior' must be one of concrete, gaussian, got 'bernoulli'"),
    "gaussian p_init beyond the clip": (lambda t: ["--posterior", "gaussian", "--set", "p_init=0.0001"],
                                        "config key 'p_init' must be in [0.00033535, 0.999665] for the gaussian "
                                        "posterior (log alpha = logit(p_init) is clipped to +-8), got 0.0001"),
    "negative KL warm-up": (lambda t: ["--set", "kl_warmup_epochs=-1"],
                            "config key 'kl_warmup_epochs' must be a number >= 0, got -1"),
    "malformed --set": (lambda t: ["--set", "lr"], "--set takes KEY=VALUE, got 'lr'"),
    "unknown --set key": (lambda t: ["--set", "lrate=0.1"], "unknown config key 'lrate'"),
    "bad --set value": (lambda t: ["--set", "schedule=linear"], "config key 'schedule' must be one of cosine"),
    "unknown backend": (lambda t: ["--backend", "opencl"], "--backend: invalid choice"),
    "unavailable backend": (lambda t: ["--backend", "cuda"], "--backend: backend 'cuda' is not available"),
    "bad device": (lambda t: ["--device", "tpu"], "--device must be cpu, cuda, cuda:N or auto"),
    "a torch device of another kind": (lambda t: ["--device", "meta"], "--device must be cpu, cuda, cuda:N or auto"),
    "unknown super-network": (lambda t: ["--set", "supernet=foo"], "unknown super-network 'foo'"),
    "unknown supernet_args key": (lambda t: ["--set", 'supernet_args={"foo": 1}'],
                                  "supernet 'digits-tiny' with supernet_args {'foo': 1} cannot be built"),
    "negative width": (lambda t: ["--set", 'supernet_args={"width": -4}'], "cannot be built"),
    "zero width": (lambda t: ["--set", 'supernet_args={"width": 0}'],
                   "cannot be built: digits super-network: width must be an int >= 1, got 0"),
    "no training set left": (lambda t: ["--set", "heldout_size=100000"],
                             "test_size=360 and heldout_size=100000 leave no training set"),
    "negative test size": (lambda t: ["--set", 'data_args={"test_size": -1}'],
                           "config key 'data_args.test_size' must be an int > 0, got -1"),
    "test size not a number": (lambda t: ["--set", 'data_args={"test_size": "x"}'],
                               "config key 'data_args.test_size' must be an int > 0, got 'x'"),
    "test size too large": (lambda t: ["--set", 'data_args={"test_size": 1700}'], "leave no training set"),
    "test size below the classes": (lambda t: ["--set", 'data_args={"test_size": 5}'],
                                    "each must be >= 10, one per class"),
    "held-out size below the classes": (lambda t: ["--set", "heldout_size=5"], "each must be >= 10, one per class"),
    "unknown data_args key": (lambda t: ["--set", 'data_args={"tset_size": 100}'],
                              "config key 'data_args' of dataset digits takes test_size; got 'tset_size'"),
    # an ImageFolder tree's augmentation (before any data is read: no --data-dir needed to be told)
    "crop share of zero": (lambda t: ["--set", "dataset=imagenet", "--set", 'data_args={"crop_scale": [0, 1]}'],
                           "config key 'data_args.crop_scale' must be a list [min, max] of area shares, 0 < min <= "
                           "max <= 1, got [0, 1]"),
    "crop shares reversed": (lambda t: ["--set", "dataset=imagenet", "--set", 'data_args={"crop_scale": [0.9, 0.5]}'],
                             "must be a list [min, max] of area shares, 0 < min <= max <= 1, got [0.9, 0.5]"),
    "one crop share": (lambda t: ["--set", "dataset=imagenet", "--set", 'data_args={"crop_scale": [0.5]}'],
                       "must be a list [min, max] of area shares"),
    "crop share a bool": (lambda t: ["--set", "dataset=imagenet", "--set", 'data_args={"crop_scale": [true, 1]}'],
                          "must be a list [min, max] of area shares, 0 < min <= max <= 1, got [true, 1]"),
    "flip not a bool": (lambda t: ["--set", "dataset=imagenet", "--set", 'data_args={"flip": "no"}'],
                        "config key 'data_args.flip' must be true or false, got 'no'"),
    "a digits key on a tree": (lambda t: ["--set", "dataset=imagenet", "--set", 'data_args={"test_size": 5}'],
                               "config key 'data_args' of dataset imagenet takes crop_scale, flip; got 'test_size'"),
    "split seed past numpy's": (lambda t: ["--set", "split_seed=99999999999999999999"],
                                "config key 'split_seed' must be an int in [0, 2^32)"),
    "super-network for other images": (lambda t: ["--set", "supernet=supnet-m", "--set", 'supernet_args={"k": 1}'],
                                       "the super-network does not take this data set's 1x8x8 images: GatedConv2d: "
                                       "expected input[1, 1, 8, 8] to have 3 channels"),
    "input size not the dataset's": (lambda t: ["--set", "input_size=16"],
                                     "config key 'input_size' must be 8 for dataset digits (its images are 8x8), "
                                     "got 16"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, case):
    args, message = BAD_INPUTS[case]
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "search", *args(tmp_path), "--out", str(out))
    assert code == 2
    assert stderr.startswith("pgnas-fast: error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert not out.exists()


def test_unwritable_out_is_refused_and_leaves_nothing(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, message in ((blocker, "exists and is not a directory"), (blocker / "sub" / "run", "is not writable")):
        code, _, stderr = run_cli(capsys, "search", "--out", str(out))
        assert code == 2 and message in stderr and stderr.count("\n") == 1
    assert blocker.read_text() == "x"
    code, _, stderr = run_cli(capsys, "search", "--out", "/proc/pgnas-fast-test/run")
    assert code == 2 and "is not writable" in stderr


def test_a_search_into_a_run_is_refused_without_resume_or_overwrite(capsys, tmp_path):
    """One forgotten --resume must not replace a run of days: a finished or an interrupted run is
    refused, named, with both ways on; nothing in the directory changes."""
    out = tmp_path / "run"
    assert run_cli(capsys, "search", *SMALL, "--out", str(out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, stderr = run_cli(capsys, "search", *SMALL, "--out", str(out))
    assert code == 2 and stderr == (f"pgnas-fast: error: {str(out)!r} holds a run (finished): --resume continues it, "
                                    "--overwrite replaces it whole (its rank-*/, study-*/, train-*/ and correlate-*/ "
                                    "results too), or search into another --out\n")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "summary.json").unlink()  # as a run interrupted after its second epoch leaves it
    lines = (out / "train_log.jsonl").read_text().splitlines(keepends=True)
    (out / "train_log.jsonl").write_text("".join(lines[:1] * 2) + '{"epoch": 3, "lo')  # (a line cut by the kill)
    code, _, stderr = run_cli(capsys, "search", *SMALL, "--out", str(out))
    assert code == 2 and f"{str(out)!r} holds a run (trained 2 epochs, not finished): --resume" in stderr
    (out / "train_log.jsonl").write_text("".join(lines))
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--out", str(out), "--resume")  # trains nothing more
    assert code == 0 and "  time: training " in stdout and " s (of 1 epoch, 1 trained before this --resume), " in stdout


def test_a_search_with_overwrite_replaces_the_old_run_and_what_was_derived_from_it(capsys, tmp_path):
    """Rankings and studies of the old checkpoint go with it: a `rank --resume` would reuse their scores.
    In a directory that held no run, nothing is removed."""
    out = tmp_path / "run"
    # a directory that holds no run: folders of those names are the user's and stay
    (out / "rank-mine").mkdir(parents=True)
    (out / "study-old").mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli(capsys, "search", *SMALL, "--out", str(out))[0] == 0
    assert (out / "rank-mine").is_dir() and (out / "study-old").is_dir() and (out / "notes.txt").is_file()
    for derived in ("rank-default", "study-default", "rank-search"):
        (out / derived).mkdir(exist_ok=True)
        (out / derived / "progress-rank0.jsonl").write_text('{"round": 0, "id": 1, "correct": 999}\n')
    (out / "exports").mkdir()  # not the run's: stays
    assert run_cli(capsys, "search", *SMALL, "--out", str(out), "--overwrite")[0] == 0  # replaces the run above
    assert not (out / "rank-default").exists() and not (out / "study-default").exists()
    assert '"correct": 999' not in (out / "rank-search" / "progress-rank0.jsonl").read_text()
    assert (out / "exports").is_dir() and (out / "notes.txt").is_file()


def test_smoke_and_the_other_family_have_their_own_default_run_directories(capsys, tmp_path, monkeypatch):
    """Neither replaces the preset's own run of the seed (a Gaussian search after the concrete one
    did, at the same default directory)."""
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run_cli(capsys, "search", "--smoke", "--quiet")
    assert code == 0 and stdout.strip().splitlines()[-1] == "run directory: runs/digits-tiny-seed0-smoke"
    code, stdout, _ = run_cli(capsys, "search", "--smoke", "--quiet", "--set", "posterior=gaussian")
    assert code == 0 and stdout.strip().splitlines()[-1] == "run directory: runs/digits-tiny-gaussian-seed0-smoke"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["digits-tiny-gaussian-seed0-smoke",
                                                                     "digits-tiny-seed0-smoke"]


def test_run_files_are_readable_by_others_as_the_umask_allows(capsys, tmp_path):
    import os

    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert run_cli(capsys, "search", *SMALL, "--out", str(out))[0] == 0
    finally:
        os.umask(old)
    for name in ("config.json", "checkpoint.pt", "architecture.json", "summary.json", "candidates.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("command, hint", [("search", "`pgnas-fast search --resume`"),
                                           ("rank", "`pgnas-fast rank --resume`"), ("study", None), ("export", None)])
def test_an_interrupt_says_how_to_continue(capsys, monkeypatch, command, hint):
    from pgnas_fast import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_" + command, interrupted)
    argv = {"search": ["search"], "rank": ["rank", "R"], "study": ["study", "R"],
            "export": ["export", "R", "--out", "O"]}
    code, _, stderr = run_cli(capsys, *argv[command])
    assert code == 130 and stderr.startswith("pgnas-fast: interrupted")
    assert (hint in stderr) if hint else "--resume" not in stderr
    if hint and command == "search":  # a process of a torchrun: the resume is a torchrun of as many
        monkeypatch.setenv("WORLD_SIZE", "2")
        code, _, stderr = run_cli(capsys, *argv[command])
        assert stderr == "pgnas-fast: interrupted; the same torchrun command with --resume continues\n"

def test_an_interrupt_while_torch_loads_is_taken_once_it_has_loaded():
    """The console script imports pgnas_fast.cli without torch; a Ctrl-C (a real SIGINT) that lands while
    main()'s own imports load torch is taken once torch is whole, and answered as one later."""
    script = """
import signal
import sys

import pgnas_fast.cli

assert "torch" not in sys.modules, "importing the package and its cli loaded torch"


class InterruptTorch:  # Ctrl-C while torch is being imported, halfway
    def find_spec(self, name, path=None, target=None):
        if name == "torch.nn":
            signal.raise_signal(signal.SIGINT)
        return None  # (the import goes on)


sys.meta_path.insert(0, InterruptTorch())
code = pgnas_fast.cli.main(["info"])
import torch

assert isinstance(torch.ones(2), torch.Tensor)  # not left half-initialised
sys.exit(code)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (130, "pgnas-fast: interrupted\n")


def test_interrupts_deferred_takes_a_ctrl_c_when_the_block_ends():
    from pgnas_fast.interrupts import interrupts_deferred

    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # (two presses: one interrupt)
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_a_sigterm_stops_a_command_as_a_ctrl_c_does(capsys, monkeypatch):
    """A scheduler's preemption (SIGTERM) raises inside the command, so its files and locks are left as
    after a Ctrl-C, and says how to continue, with status 143; main gives the handler back."""
    from pgnas_fast import cli

    def preempted(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_rank", preempted)
    code, _, stderr = run_cli(capsys, "rank", "R")
    assert (code, stderr) == (143, "pgnas-fast: terminated (SIGTERM); `pgnas-fast rank --resume` with the same "
                                   "arguments continues\n")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_during_a_deferred_step_is_taken_when_it_ends():
    from pgnas_fast.interrupts import Terminated, interrupts_deferred, terminations_raised

    finished = []
    with terminations_raised(), pytest.raises(Terminated):
        with interrupts_deferred():
            signal.raise_signal(signal.SIGTERM)
            finished.append(True)
    assert finished == [True] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_search_stopped_by_sigterm_resumes(tmp_path):
    """A real SIGTERM to `pgnas-fast search` after its first checkpoint: status 143, the one-line hint,
    and `--resume` finishes the run."""
    import time

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "pgnas_fast.cli", "search", "--epochs", "30", "--candidates", "4",
            "--random-baseline", "0", "--out", str(out), "--quiet"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.endswith("pgnas-fast: terminated (SIGTERM); `pgnas-fast search --resume` with the same arguments "
                           "continues\n")
    assert not (out / "summary.json").exists()
    resumed = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["resumed_from_epoch"] >= 1


def test_info_of_a_run_directory_says_what_it_holds(capsys, finished_run, tmp_path):
    """From the run's JSON files alone: the search's progress and choice, each ranking (finished or not) and
    study, then its super-network's sizes (its own config's: here the preset's)."""
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    arch = json.loads((run / "architecture.json").read_text())
    assert run_cli(capsys, "rank", str(run), "--candidates", "4", "--max-params", "34000", "--tag", "small",
                   "--quiet")[0] == 0
    ranked = json.loads((run / "rank-small" / "summary.json").read_text())
    (run / "rank-cut").mkdir()
    (run / "rank-cut" / "progress-rank0.jsonl").write_text('{"round": 0, "id": 1}\n{"round": 0, "id": 2}\n{"ro')
    code, out, err = run_cli(capsys, "info", str(run))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{run}: search of digits-tiny, seed 3, concrete posterior"
    assert lines[1] == "  training   2 of 2 epochs, search finished"
    assert lines[2] == (f"  chosen     candidate {arch['candidate']} of 6: held-out {100 * arch['score']:.2f}%, test "
                        f"{100 * arch['test_accuracy']:.2f}%, {arch['params']:,} parameters, {arch['macs']:,} MACs "
                        "per image")
    best = ranked["best"]
    assert lines[3] == ("  ranking    rank-cut: started, not finished (2 candidate-rounds logged; --resume continues "
                        "it)")
    assert lines[4] == (f"  ranking    rank-small: finished, best {best['id']} ({100 * best['score']:.2f}% on 300 "
                        f"images) of {ranked['ranked_candidates']} that fit the budget (at most 34,000 parameters) "
                        f"of 4 drawn, exhaustive, Pareto front of {len(ranked['pareto'])} (pareto.json)")
    assert lines[5].startswith("digits-tiny: super-network digits-tiny, 10 classes")
    assert "  parameters      35,670" in out
    code, out, _ = run_cli(capsys, "info", str(run), "--json")
    facts = json.loads(out)
    assert facts["params"] == 35670 and facts["run"]["epochs_trained"] == 2 and facts["run"]["finished"]
    assert [r["tag"] for r in facts["run"]["rankings"]] == ["cut", "small"]  # (not the search's own logs)
    # an unfinished run: no choice yet
    (run / "summary.json").unlink()
    code, out, _ = run_cli(capsys, "info", str(run))
    assert "  training   2 of 2 epochs, search not finished" in out and "chosen" not in out
    code, _, err = run_cli(capsys, "info", str(tmp_path / "none"))
    assert code == 2 and "is not a run directory: no readable config.json" in err
    code, _, err = run_cli(capsys, "info", str(run), "--preset", "digits-tiny")
    assert code == 2 and "pass RUN_DIR or --preset, not both" in err
    # a config of a key this version does not know (a newer version's run): info and the readers say so
    written = json.loads((run / "config.json").read_text())
    written["config"]["from_the_future"] = 1
    (run / "config.json").write_text(json.dumps(written))
    for command in (["info", str(run)], ["rank", str(run), "--quiet"]):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and (f"{str(run / 'config.json')!r} is malformed or from another version: unknown config "
                              "key 'from_the_future'") in err, command


def test_info_lists_every_kind_of_result_from_its_files(capsys, finished_run, tmp_path):
    """Each folder's line from its own JSON files: a ranking of the best checkpoint, a torchrun ranking's
    logs of every rank, a study, a cut training, a finished correlation of the ranking's top and a cut one."""
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)

    def write(path, text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if isinstance(text, str) else json.dumps(text))

    write(run / "rank-b" / "summary.json", {
        "best": {"id": 4, "score": 0.5, "images": 300}, "candidates": 6, "ranked_candidates": 6, "strategy": "racing",
        "evaluator": "batched", "bn_recalibrate": 0, "checkpoint": "best", "checkpoint_epoch": 1, "max_params": 0,
        "max_macs": 0, "pareto": None})
    write(run / "rank-cut" / "progress-rank0.jsonl", '{"round": 0, "id": 1}\n{"round": 0, "id": 2}\n')
    write(run / "rank-cut" / "progress-rank1.jsonl", '{"round": 0, "id": 3}\n')
    write(run / "study-x" / "study.json", {"candidates": 40, "checkpoint": "last", "checkpoint_epoch": 2,
                                           "guided": {"mean": 0.9}, "random": {"mean": 0.5}})
    (run / "study-cut").mkdir()  # a study stopped before it wrote study.json
    write(run / "train-cut" / "settings.json", {})
    write(run / "train-cut" / "train_log.jsonl", '{"epoch": 1, "loss": 1.0}\n')
    write(run / "correlate-cut" / "c7" / "export.json", {})
    (run / "correlate-cut" / "c5").mkdir()  # started, nothing written yet
    write(run / "correlate-top" / "correlation.json", {"candidates": [{}, {}], "pick": "top", "kendall_tau": 0.5,
                                                       "spearman_rho": 0.25, "training": {}})
    code, out, err = run_cli(capsys, "info", str(run))
    assert code == 0 and err == ""
    for line in ("  ranking    rank-b: finished, best 4 (50.00% on 300 images) of 6, racing, checkpoint-best.pt of "
                 "epoch 1",
                 "  ranking    rank-cut: started, not finished (3 candidate-rounds logged; --resume continues it)",
                 "  study      study-cut: started, not finished",
                 "  study      study-x: finished, 40 candidates, guided mean 90.00% against random 50.00%",
                 "  alone      train-cut: started, not finished (1 epoch trained; --resume continues it)",
                 "  correlate  correlate-cut: started, not finished (1 candidate trained; --resume continues it)",
                 "  correlate  correlate-top: finished, 2 candidates (the ranking's top): Kendall's tau 0.500, "
                 "Spearman's rho 0.250"):
        assert line in out.splitlines(), line
    facts = json.loads(run_cli(capsys, "info", str(run), "--json")[1])
    arch = json.loads((run / "architecture.json").read_text())
    assert facts["run"]["chosen"]["kept_fraction"] == arch["kept_fraction"] and facts["num_classes"] == 10


def test_runs_are_one_protocol_only_with_the_same_preset_posterior_and_changes():
    from pgnas_fast.search.run_info import across_runs

    def run(seed, posterior="concrete", changes=None, config=None, preset="digits-tiny"):
        return {"preset": preset, "posterior": posterior, "changes": changes, "config": config or {}, "seed": seed,
                "chosen": {"heldout_accuracy": 0.5, "test_accuracy": 0.5, "params": 1, "macs": 1}}

    rows = across_runs([run(1, changes={}), run(2, changes={}), run(3, "gaussian", changes={}),
                        run(4, changes={"epochs": 3}),
                        # configs that do not resolve (another version's): grouped by their whole config
                        run(5, config={"epochs": 1}, preset="gone"), run(6, config={"epochs": 2}, preset="gone"),
                        run(7, config={"epochs": 2}, preset="gone")])
    assert [r["seeds"] for r in rows] == [[1, 2], [3], [4], [5], [6, 7]]
    assert [r["posterior"] for r in rows] == ["concrete", "gaussian", "concrete", "concrete", "concrete"]


def test_info_of_several_runs_averages_each_protocol_over_its_seeds(capsys, finished_run, tmp_path):
    """Runs that differ only in their seed are one protocol: the mean and sample spread of their chosen
    candidates; a run whose config differs otherwise is its own protocol, named by its changes; an
    unfinished run is listed, not averaged."""
    import statistics

    def copy(name, seed, score, test, params, macs, **config_changes):
        run = tmp_path / name
        shutil.copytree(finished_run[0], run)
        run_config = json.loads((run / "config.json").read_text())
        run_config["seed"] = seed
        run_config["config"].update(config_changes)
        (run / "config.json").write_text(json.dumps(run_config))
        arch = json.loads((run / "architecture.json").read_text())
        arch.update(score=score, test_accuracy=test, params=params, macs=macs)
        (run / "architecture.json").write_text(json.dumps(arch))
        return run

    runs = [copy("a", 3, 0.9, 0.8, 1000, 50_000), copy("b", 4, 0.7, 0.6, 3000, 70_000),
            copy("c", 5, 0.5, 0.5, 10, 10, epochs=3), copy("d", 6, 0.1, 0.1, 1, 1)]
    (runs[3] / "summary.json").unlink()
    code, out, err = run_cli(capsys, "info", *map(str, runs))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["run", "preset", "posterior", "seed", "epochs", "candidate", "held-out", "test",
                                "params", "MACs"]
    assert lines[2].split()[-4:] == ["70.00%", "60.00%", "3,000", "70,000"]
    assert lines[4].split()[1:] == ["digits-tiny", "concrete", "6", "2/2", "(search", "not", "finished)"]
    std = statistics.stdev([0.9, 0.7])
    assert lines[5] == (f"digits-tiny (concrete; candidates 6; epochs 2; random_baseline 4), 2 finished runs (seeds 3, "
                        f"4; not finished: seed 6): held-out 80.00% ± {100 * std:.2f}%, test 70.00% ± "
                        f"{100 * std:.2f}%, parameters 2,000 ± 1,414, MACs per image 60,000 ± 14,142 (mean ± sample "
                        "std)")
    assert lines[6].startswith("digits-tiny (concrete; candidates 6; epochs 3; random_baseline 4), 1 finished run "
                               "(seed 5): held-out 50.00%, test 50.00%, parameters 10, MACs per image 10")
    facts = json.loads(run_cli(capsys, "info", *map(str, runs), "--json")[1])
    assert [r["seed"] for r in facts["runs"]] == [3, 4, 5, 6]
    first = facts["across_runs"][0]
    assert first["test_accuracy"] == {"mean": pytest.approx(0.7), "std": pytest.approx(std), "min": 0.6, "max": 0.8}
    assert first["changes"] == {"epochs": 2, "candidates": 6, "random_baseline": 4} and first["seeds"] == [3, 4]
    assert first["unfinished"] == [6]
    # a run given twice is refused; two runs of one seed are said not to be independent
    code, _, err = run_cli(capsys, "info", str(runs[0]), str(runs[0]) + "/")
    assert code == 2 and "is given twice" in err
    twin = copy("e", 3, 0.9, 0.8, 1000, 50_000)
    code, out, _ = run_cli(capsys, "info", str(runs[0]), str(twin))
    assert "(seeds 3, 3)" in out and "note: a seed repeats, and runs of one seed repeat one search" in out
    # a protocol with no finished run
    code, out, _ = run_cli(capsys, "info", str(runs[3]), str(runs[2]))
    assert "digits-tiny (concrete; candidates 6; epochs 2; random_baseline 4): no finished run; not finished: seed 6" \
        in out


def test_version(capsys):
    from pgnas_fast import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"pgnas-fast {__version__}\n"


def test_no_command_prints_help_and_exits_2(capsys):
    code, stdout, _ = run_cli(capsys, )
    assert code == 2 and "search" in stdout and "doctor" in stdout


def test_search_help_names_each_presets_random_baseline(capsys, monkeypatch):
    """The help's default for --random-baseline is read from the presets, not written beside them."""
    from pgnas_fast.cli import _preset_defaults

    text = _preset_defaults(configs, "random_baseline")
    for name in configs.names():
        value = configs.resolve(name)["random_baseline"]
        assert f"{value} on {name}" in text or (f"{value} on the others" in text and name not in text)
    monkeypatch.setitem(configs.PRESETS["cifar10-supnet-m"], "random_baseline", 7)
    assert "7 on cifar10-supnet-m" in _preset_defaults(configs, "random_baseline")
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    assert "default the preset's: 7 on cifar10-supnet-m, 200 on digits-tiny, 0 on the others" in " ".join(
        capsys.readouterr().out.split())


def test_console_script_is_installed():
    exe = shutil.which("pgnas-fast")
    assert exe, "pgnas-fast is not on PATH: install the package (README)"
    result = subprocess.run([exe, "search", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--candidates" in result.stdout and "--preset" in result.stdout


def test_module_entry_point_reports_errors_with_status_2():
    result = subprocess.run([sys.executable, "-m", "pgnas_fast.cli", "search", "--epochs", "-2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--epochs" in result.stderr


@pytest.mark.parametrize("unbuffered", [True, False])
def test_a_closed_stdout_stops_a_command_quietly(unbuffered):
    """`pgnas-fast info | head -1`: the reader left, which ended the command on a BrokenPipeError traceback
    (or, with stdout block-buffered as a pipe usually is, on the exit's failed flush)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen([sys.executable, "-m", "pgnas_fast.cli", "info"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 141 and stderr == b""


def test_a_broken_pipe_other_than_stdout_is_reported(capsys, monkeypatch):
    import pgnas_fast.cli as cli

    def info(args):
        raise BrokenPipeError(32, "Broken pipe")  # e.g. a worker's pipe, while stdout is fine

    monkeypatch.setattr(cli, "_info", info)
    with pytest.raises(BrokenPipeError):
        cli.main(["info"])


def test_presets_validate_every_key():
    config = configs.resolve("digits-tiny")
    assert set(config) == {"preset", *configs.SCHEMA}
    with pytest.raises(configs.ConfigError, match="config key 'lr' must be a number > 0, got 0"):
        configs.resolve("digits-tiny", {"lr": 0})
    with pytest.raises(configs.ConfigError, match="config key 'supernet_args' must be an object"):
        configs.resolve("digits-tiny", {"supernet_args": [1]})
    # unquoted keys are not JSON: the value arrives as text, and the message says why
    _, text = configs.parse_assignment("supernet_args={width: 8}")
    with pytest.raises(configs.ConfigError, match=re.escape("got '{width: 8}' (not valid JSON: quote the keys")):
        configs.resolve("digits-tiny", {"supernet_args": text})
    with pytest.raises(configs.ConfigError, match=r"must be an int > 0, got 'eight'$"):
        configs.resolve("digits-tiny", {"epochs": "eight"})  # (plain text: no JSON hint)


def test_family_settings_apply_between_the_preset_and_the_overrides():
    concrete, gaussian = configs.resolve("digits-tiny"), configs.resolve("digits-tiny", {"posterior": "gaussian"})
    settings = configs.FAMILY_SETTINGS["digits-tiny"]["gaussian"]
    assert settings and all(gaussian[key] == value != concrete[key] for key, value in settings.items())
    family_keys = {*settings, "posterior", "kl_warmup_epochs"}
    assert {k: v for k, v in gaussian.items() if k not in family_keys} == {
        k: v for k, v in concrete.items() if k not in family_keys}
    assert concrete["posterior"] == "concrete" and concrete["n_train"] == 0 and concrete["kl_warmup_epochs"] == 0
    assert configs.resolve("digits-tiny", {"posterior": "gaussian", "n_train": 5})["n_train"] == 5  # user wins
    # the family's KL warm-up: a sixth of the epochs after the overrides (it stayed at the preset's 5 of
    # 30 epochs when --epochs cut training to 6), unless set itself
    assert gaussian["kl_warmup_epochs"] == 5
    assert configs.resolve("digits-tiny", {"posterior": "gaussian", "epochs": 12})["kl_warmup_epochs"] == 2
    assert configs.resolve("digits-tiny", {"posterior": "gaussian", "epochs": 12, "kl_warmup_epochs": 0}
                           )["kl_warmup_epochs"] == 0
    assert configs.resolve("digits-tiny", {"epochs": 12})["kl_warmup_epochs"] == 0
    # a run's recorded config resolves to itself (load_run, resume)
    assert configs.resolve("digits-tiny", {k: v for k, v in gaussian.items() if k != "preset"}) == gaussian


def test_an_error_raised_in_a_data_loader_worker_is_one_line(capsys, monkeypatch):
    """DataLoader re-raises a worker's error with the worker's traceback in its message: the CLI prints
    the error itself."""
    from pgnas_fast import cli
    from pgnas_fast.data import DataError

    def worker_error(args):
        raise DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in <module>\npgnas_fast.data.errors.DataError: cannot "
                        "decode image a.JPEG (UnidentifiedImageError: cannot identify image file 'a.JPEG')\n")

    monkeypatch.setattr(cli, "_info", worker_error)
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == ("pgnas-fast: error: cannot decode image a.JPEG (UnidentifiedImageError: "
                                       "cannot identify image file 'a.JPEG')\n")


def test_a_run_and_its_export_refuse_data_other_than_their_own(capsys, tmp_path):
    """data.json records the data's fingerprint: a resume, rank, export or evaluate given another data set
    is refused (its held-out split would be other images), a moved copy of the same data is taken."""
    from data_fixtures import write_cifar10

    own, other = tmp_path / "own", tmp_path / "other"
    write_cifar10(own, seed=0)
    write_cifar10(other, seed=1)
    out, exported = tmp_path / "run", tmp_path / "export"
    search = ["search", "--preset", "cifar10-supnet-m", "--smoke", "--set", "batch_size=16", "--set",
              "heldout_size=50", "--set", 'supernet_args={"k": 1, "blocks_per_stage": 1}', "--out", str(out), "--quiet"]
    assert run_cli(capsys, *search, "--data-dir", str(own))[0] == 0
    record = json.loads((out / "data.json").read_text())
    assert record["data_dir"] == str(own.resolve()) and len(record["fingerprint"]) == 16
    shutil.copytree(own, tmp_path / "moved")
    rank = ["rank", str(out), "--candidates", "2", "--strategy", "exhaustive", "--quiet"]
    assert run_cli(capsys, *rank, "--data-dir", str(tmp_path / "moved"), "--tag", "moved")[0] == 0
    assert run_cli(capsys, "export", str(out), "--out", str(exported))[0] == 0
    assert json.loads((exported / "data.json").read_text()) == record
    for argv in ([*search, "--resume", "--data-dir", str(other)], [*rank, "--data-dir", str(other)],
                 ["export", str(out), "--data-dir", str(other), "--out", str(tmp_path / "other-export")],
                 ["evaluate", str(exported), "--data-dir", str(other)]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and f"the data under '{other}' is not the data" in err, argv
        assert f"(from '{own.resolve()}'" in err
    assert not (tmp_path / "other-export").exists()
    (out / "data.json").write_text("{")
    code, _, err = run_cli(capsys, *rank)
    assert code == 2 and "data.json' is malformed (JSONDecodeError" in err and "pass --data-dir" in err


def test_schedule_keys_the_schedule_does_not_read_are_said(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--set", "milestones=[5]", "--set", "sgdr_t0=4",
                              "--set", "lr_min=0.001", "--out", str(out))
    assert code == 0  # digits: cosine, which reads lr_min only
    assert "note: milestones set, but only the step schedule reads it; this run's schedule is cosine" in stdout
    assert "note: sgdr_t0 set, but only the sgdr schedule reads it" in stdout
    assert "lr_min set" not in stdout
    code, stdout, _ = run_cli(capsys, "search", *SMALL, "--set", "schedule=step", "--set", "lr_min=0.001",
                              "--set", "gamma=0.5", "--out", str(out), "--overwrite")
    assert code == 0 and "note: lr_min set, but only the cosine and sgdr schedules read it" in stdout
    assert "gamma set" not in stdout


def test_a_protocol_is_named_by_its_own_changes_not_by_derived_keys():
    """A Gaussian run with other epochs has another KL warm-up, derived from them: only the epochs are its
    change; a warm-up set by hand is one."""
    from pgnas_fast.search.run_info import _changes

    derived = configs.resolve("digits-tiny", {"posterior": "gaussian", "epochs": 5})
    assert _changes(derived) == {"epochs": 5}
    assert _changes({**derived, "kl_warmup_epochs": 3}) == {"epochs": 5, "kl_warmup_epochs": 3}
    assert _changes(configs.resolve("digits-tiny")) == {} and _changes({"preset": "nope"}) is None


def test_the_ranking_settings_a_refused_resume_names_are_rank_s_options():
    """search.run.RANK_OPTIONS: the advice of a resume refused for ranking settings is a command rank takes."""
    from pgnas_fast.cli import _build_parser
    from pgnas_fast.search.run import RANK_OPTIONS

    values = {"candidates": "9", "ranking": "racing", "racing_eta": "3", "racing_first_share": "0.25",
              "max_params": "1000", "max_macs": "2000"}
    assert set(RANK_OPTIONS) == set(values) and set(values) <= set(configs.resolve("digits-tiny"))
    argv = ["rank", "RUN"] + [part for key in values for part in (RANK_OPTIONS[key], values[key])]
    args = vars(_build_parser().parse_args(argv))
    assert [args[name] for name in ("candidates", "strategy", "eta", "first_share", "max_params", "max_macs")] == \
        [9, "racing", 3, 0.25, 1000, 2000]

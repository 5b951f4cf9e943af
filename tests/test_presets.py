"""The paper presets end to end on generated data in the standard layouts: `pgnas-fast search
--smoke` and `pgnas-fast info`, and the clear error for missing data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_cifar10, write_cifar100, write_image, write_imagenet

from pgnas_fast.cli import main
from pgnas_fast.search.report import write_report

# keep the full-size networks cheap on 2 CPU cores: tiny batches, no DataLoader workers
CHEAP = ["--set", "batch_size=4", "--set", "eval_batch_size=4", "--set", "workers=0", "--set", "threads=1",
         "--set", "heldout_size=20", "--quiet"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def search(capsys, *argv):
    code = main(["search", *map(str, argv)])
    return code, capsys.readouterr()


@pytest.mark.parametrize("preset, writer", [
    ("cifar10-supnet-m", write_cifar10),
    pytest.param("cifar100-supnet-mi", write_cifar100, marks=pytest.mark.slow),
    ("cifar10-supnet-e", write_cifar10),
    ("imagenet-d121", write_imagenet),
    pytest.param("imagenet-r50", write_imagenet, marks=pytest.mark.slow),
])
def test_smoke_runs_every_paper_preset_on_generated_data(capsys, tmp_path, preset, writer):
    data = tmp_path / "data"
    if writer is write_imagenet:
        writer(data, train_per_class=10)
    else:
        writer(data)
    out = tmp_path / "run"
    extra = ["--set", "supernet_args={\"drop_path_keep_prob\": 0.6}"] if "supnet-e" in preset else []
    code, captured = search(capsys, "--preset", preset, "--data-dir", data, "--smoke", "--out", out, *CHEAP, *extra)
    assert code == 0, captured.err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["cross_entropy"] > 0 and log[0]["regularizer"] != 0
    # the loss is the objective; an auxiliary head's (ENAS) weighted cross-entropy is logged apart
    aux = log[0].get("aux_cross_entropy", 0.0)
    assert (aux > 0) == ("supnet-e" in preset)
    assert log[0]["loss"] == pytest.approx(log[0]["cross_entropy"] + aux + log[0]["regularizer"], rel=1e-6)
    assert ("the auxiliary head's weighted cross-entropy" in (out / "report.md").read_text()) == (aux > 0)
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and max(r["images"] for r in rows) == 8  # 2 batches of 4
    arch = json.loads((out / "architecture.json").read_text())
    assert arch["preset"] == preset and arch["layers"]
    assert f"run directory: {out}" in captured.out
    # no comparison with the paper for a smoke check; outside one, the changed protocol keys are named
    assert "| paper |" not in (out / "report.md").read_text()
    assert "| posterior training | 1 epoch, " in (out / "report.md").read_text()  # (not "1 epochs")
    # what the numbers come from: 2 steps, 2 batches of 4 (not the splits' sizes)
    summary = json.loads((out / "summary.json").read_text())
    heldout, test = (min(summary["data"][name], 8) for name in ("heldout", "test"))
    assert summary["smoke"] == {"training_steps": 2, "heldout": heldout, "test": test}
    assert (f"smoke check: 2 training steps, candidates scored on {heldout} held-out and {test} test images: data and "
            "config work, the numbers mean nothing yet") in captured.out
    assert (f"; smoke check: 2 training steps, scored on {heldout} held-out and {test} test images |"
            in (out / "report.md").read_text())
    # outside a smoke check the report compares with the paper, naming the protocol keys the run changed
    (out / "summary.json").write_text(json.dumps({**summary, "smoke": None}))
    paper = [line for line in write_report(out).read_text().splitlines() if line.startswith("| paper |")]
    assert len(paper) == 1 and paper[0].endswith("(with another epochs, batch_size than the preset's) |"), paper
    # a run older than a protocol key (here: posterior) ran the preset's value
    run_config = json.loads((out / "config.json").read_text())
    del run_config["config"]["posterior"]
    (out / "config.json").write_text(json.dumps(run_config))
    assert paper[0] in write_report(out).read_text().splitlines()


def test_later_commands_read_the_run_s_data_dir(capsys, tmp_path):
    """rank, study, export and evaluate of a CIFAR run default to the --data-dir the search read
    (data.json), as does search --resume; a given --data-dir still wins, and a fresh digits search into the
    directory drops it."""
    write_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    code, captured = search(capsys, "--preset", "cifar10-supnet-m", "--data-dir", tmp_path / "data", "--smoke",
                            "--out", out, *CHEAP)
    assert code == 0, captured.err
    assert json.loads((out / "data.json").read_text())["data_dir"] == str((tmp_path / "data").resolve())
    assert main(["rank", str(out), "--candidates", "2", "--quiet"]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "export")]) == 0
    assert main(["evaluate", str(tmp_path / "export")]) == 0
    assert capsys.readouterr().err == ""
    # output i's name, from the release's batches.meta
    names = [f"class{i}" for i in range(10)]
    assert json.loads((tmp_path / "export" / "export.json").read_text())["classes"] == names
    assert json.loads((out / "summary.json").read_text())["classes"] == names
    assert main(["rank", str(out), "--candidates", "2", "--quiet", "--tag", "elsewhere", "--data-dir",
                 str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    code, captured = search(capsys, "--preset", "cifar10-supnet-m", "--smoke", "--out", out, "--resume", *CHEAP)
    assert code == 0, captured.err
    assert search(capsys, "--out", out, "--epochs", "1", "--candidates", "2", "--random-baseline", "0",
                  "--quiet", "--overwrite")[0] == 0
    assert not (out / "data.json").exists()


def test_smoke_with_the_gaussian_posterior_on_a_cifar_preset(capsys, tmp_path):
    write_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    code, captured = search(capsys, "--preset", "cifar10-supnet-m", "--posterior", "gaussian", "--data-dir",
                            tmp_path / "data", "--smoke", "--out", out, *CHEAP)
    assert code == 0, captured.err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["cross_entropy"] > 0 and log[0]["regularizer"] > 0
    arch = json.loads((out / "architecture.json").read_text())
    assert arch["posterior"] == "gaussian" and arch["preset"] == "cifar10-supnet-m"
    assert "| posterior | gaussian: " in (out / "report.md").read_text()


def test_every_preset_key_is_a_config_key():
    """resolve() checks the values of a preset's keys, not their names: a misspelt key in a preset or in
    FAMILY_SETTINGS would be carried along unread and the setting silently left at its default."""
    from pgnas_fast import configs

    for preset in configs.names():
        families = configs.FAMILY_SETTINGS.get(preset, {})
        assert set(families) <= set(configs.POSTERIORS), (preset, sorted(families))
        sources = [("PRESETS", configs.PRESETS[preset]), *((f"FAMILY_SETTINGS {f}", s) for f, s in families.items())]
        for source, keys in sources:
            assert set(keys) <= set(configs.SCHEMA), (preset, source, sorted(set(keys) - set(configs.SCHEMA)))
    assert set(configs.FAMILY_SETTINGS) <= set(configs.names())


def test_the_gaussian_kl_weighs_every_preset_as_it_does_digits():
    """configs.FAMILY_SETTINGS: with the Gaussian family, the KL at p_init per training image is the
    same share of the initial cross-entropy (ln classes) on every preset as on digits, where its N was
    tuned, and the warm-up the same share of training."""
    import math

    from pgnas_fast import configs
    from pgnas_fast.nn import network_regularizer
    from pgnas_fast.search.run import build_supernet

    classes = configs.NUM_CLASSES
    shares = {}
    for preset in configs.names():
        config = configs.resolve(preset, {"posterior": "gaussian"})
        model = build_supernet(config, classes[config["dataset"]])
        with torch.no_grad():
            kl = network_regularizer(model, weight_reg=0.0, n_train=config["n_train"], backend="reference").item()
        shares[preset] = kl / math.log(classes[config["dataset"]])
        assert config["kl_warmup_epochs"] == config["epochs"] // 6, preset
    for preset, share in shares.items():
        assert share == pytest.approx(shares["digits-tiny"], rel=0.03), (preset, shares)


@pytest.mark.parametrize("preset, layout", [
    ("cifar10-supnet-m", "cifar-10-batches-py"),
    ("cifar100-supnet-mi", "cifar-100-python"),
    ("imagenet-d121", "train/"),
])
def test_missing_data_is_a_clear_error(capsys, tmp_path, preset, layout):
    out = tmp_path / "run"
    code, captured = search(capsys, "--preset", preset, "--out", out)
    assert code == 2 and "needs --data-dir" in captured.err and layout in captured.err
    assert not out.exists(), "nothing is left behind"
    code, captured = search(capsys, "--preset", preset, "--data-dir", tmp_path / "empty", "--out", out)
    assert code == 2 and captured.err.startswith("pgnas-fast: error: ") and layout.rstrip("/") in captured.err


PAPER = {  # preset: (params, within, gated layers, p values)
    "cifar10-supnet-m": (26.2e6, 0.03, 56, 56),
    "cifar10-supnet-mi": (72.7e6, 0.03, 56, 56),
    "cifar10-supnet-ei": (15.3e6, 0.03, 263, 263),
    "imagenet-d121": (7.98e6, 0.03, 119, 638),
}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_info_reports_the_papers_sizes(capsys, preset):
    assert main(["info", "--preset", preset, "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    params, within, layers, p_values = PAPER[preset]
    assert abs(facts["params"] - params) <= within * params
    assert facts["gated_layers"] == layers and facts["gate_params"] == p_values
    assert facts["macs"] > 0 and facts["input_size"][-1] in (32, 224)


def test_info_text(capsys):
    assert main(["info", "--preset", "digits-tiny"]) == 0
    out = capsys.readouterr().out
    assert "parameters      35,670" in out and "p values        60" in out


def test_your_own_data_as_the_readme_says(capsys, tmp_path):
    """README "Your own data": an ImageFolder tree of any class names, sizes and formats searched with its
    config (the digits network on RGB images), then exported, evaluated and trained from the tree the
    run recorded."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Your own data", 1)[1]
    config = json.loads(re.search(r"```json\n(.*?)```", section, flags=re.S).group(1))
    assert config["dataset"] == "imagenet" and config["supernet_args"]["in_channels"] == 3
    assert config["data_args"] == {"crop_scale": [0.5, 1], "flip": False}
    (tmp_path / "own.json").write_text(json.dumps(config))
    data = tmp_path / "data"
    write_imagenet(data, classes=("cat", "dog", "owl"), train_per_class=24, val_per_class=4)
    rng = np.random.default_rng(1)
    for split in ("train", "val"):  # a few PNGs too
        for i in range(2):
            write_image(data / split / "owl" / f"extra-{i}.png", 37, 23, rng)
    out = tmp_path / "run"
    # the tree's 74 training images: a smaller held-out split and batch than the recipe's
    code, captured = search(capsys, "--preset", "digits-tiny", "--config", tmp_path / "own.json", "--data-dir", data,
                            "--out", out, "--set", "heldout_size=10", "--set", "batch_size=16", "--set", "workers=0",
                            "--epochs", "2", "--candidates", "8", "--random-baseline", "0", "--quiet")
    assert code == 0, captured.err
    assert "note:" not in captured.out + captured.err  # (no note of the preset's data_args: another data set's)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["heldout"] == 10 and summary["data"]["test"] == 14
    assert (f"| data | imagenet ({data}, 3 classes, training crops of 50% to 100% of the area, not flipped): 64 "
            "training, 10 held-out, 14 test images |") in (out / "report.md").read_text()
    arch = json.loads((out / "architecture.json").read_text())
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0  # the run's network: the tree's classes, not ImageNet's
    facts = json.loads(capsys.readouterr().out)
    assert (facts["num_classes"], facts["params"]) == (3, summary["params_supernet"])
    assert main(["export", str(out), "--out", str(tmp_path / "export")]) == 0
    exported = json.loads((tmp_path / "export" / "export.json").read_text())
    assert exported["input_size"] == [3, 16, 16]
    assert exported["classes"] == summary["classes"] == ["cat", "dog", "owl"]  # output i: the i-th folder, sorted
    subnet = torch.load(tmp_path / "export" / "subnet.pt", weights_only=False)
    assert subnet(torch.rand(2, 3, 16, 16)).shape == (2, 3)  # RGB in, the tree's 3 classes out
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "export")]) == 0  # the tree from the export's data.json
    assert float(capsys.readouterr().out.splitlines()[-1]) == pytest.approx(arch["test_accuracy"], abs=1e-6)
    assert main(["train", str(out), "--epochs", "1", "--quiet"]) == 0
    assert json.loads((out / "train-inherited" / "export.json").read_text())["inherited_test_accuracy"] == \
        arch["test_accuracy"]
    capsys.readouterr()
    data.rename(tmp_path / "moved")  # the recorded directory is gone: said so, and --data-dir finds the data
    assert main(["evaluate", str(tmp_path / "export")]) == 2
    assert (f"the data directory {str(tmp_path / 'export')!r} was made with, {str(data)!r}, does not exist: if the "
            "data moved, pass --data-dir where it is now") in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "export"), "--data-dir", str(tmp_path / "moved")]) == 0
    # a tree too small for the run's split: the error says the split is the run's, not the reader's to change
    write_imagenet(tmp_path / "small", classes=("a", "b"), train_per_class=3, val_per_class=2)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "export"), "--data-dir", str(tmp_path / "small")]) == 2
    assert (f"heldout_size=10 must be below 6: {tmp_path / 'small' / 'train'} has" in (err := capsys.readouterr().err)
            and f"(--data-dir {str(tmp_path / 'small')!r} is read with the config of {str(tmp_path / 'export')!r}, "
                f"made with the data under {str(data)!r}: is it that data set?)" in err)


def test_an_unreadable_image_read_late_is_named_with_how_to_go_on(capsys, tmp_path):
    """A broken file in the test split is first read after training, by a DataLoader worker: the error names
    it (not the worker's traceback's tail), and the advice keeps the data's fingerprint (same file names)."""
    data = tmp_path / "data"
    write_imagenet(data, classes=("cat", "dog"), train_per_class=12, val_per_class=2)
    (data / "val" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    code, captured = search(capsys, "--preset", "digits-tiny", "--data-dir", data, "--out", tmp_path / "run",
                            "--set", "dataset=imagenet", "--set", "input_size=8", "--set", "heldout_size=4",
                            "--set", "batch_size=4", "--set", "workers=1", "--set", 'supernet_args={"in_channels": 3}',
                            "--epochs", "1", "--candidates", "2", "--random-baseline", "0", "--quiet")
    assert code == 2 and captured.err.count("\n") == 1, captured.err
    assert f"cannot decode image {data / 'val' / 'dog' / 'broken.png'} (UnidentifiedImageError" in captured.err
    assert ("the run so far is kept: replace the unreadable file with a readable one of the same name and run the "
            "same command with --resume") in captured.err


def test_a_batch_too_small_for_batchnorm_is_refused_before_anything_is_written(capsys, tmp_path):
    write_imagenet(tmp_path / "data", train_per_class=10)
    code, captured = search(capsys, "--preset", "imagenet-d121", "--data-dir", tmp_path / "data", "--smoke",
                            "--out", tmp_path / "run", *CHEAP, "--set", "batch_size=1", "--set", "input_size=32")
    assert code == 2 and "a training batch gives the network 1 image(s)" in captured.err
    assert captured.err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_another_data_set_s_classes_are_named_not_scored(capsys, tmp_path):
    """rank and export of a run, and evaluate of its export, with a --data-dir of another class count:
    refused by data.json's fingerprint, and where a record has none (older runs), a one-line error
    saying so, not a state_dict dump or a meaningless accuracy."""
    write_imagenet(tmp_path / "data", train_per_class=10)
    write_imagenet(tmp_path / "other", train_per_class=10, classes=("n01", "n02", "n03", "n04"))
    out = tmp_path / "run"
    code, captured = search(capsys, "--preset", "imagenet-d121", "--data-dir", tmp_path / "data", "--smoke",
                            "--out", out, *CHEAP)
    assert code == 0, captured.err
    assert main(["export", str(out), "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    for argv in (["rank", str(out), "--candidates", "2", "--quiet"], ["evaluate", str(tmp_path / "export")]):
        assert main([*argv, "--data-dir", str(tmp_path / "other")]) == 2  # not the data of data.json's fingerprint
        assert f"the data under '{tmp_path / 'other'}' is not the data" in capsys.readouterr().err
    for directory in (out, tmp_path / "export"):  # records older than the fingerprint: the class count tells
        record = json.loads((directory / "data.json").read_text())
        (directory / "data.json").write_text(json.dumps({"data_dir": record["data_dir"]}))
    assert main(["rank", str(out), "--candidates", "2", "--quiet", "--data-dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "super-network for the data's 4 classes (Error(s) in loading state_dict" in err
    assert "size mismatch" in err and "is --data-dir the data set the run searched on?" in err
    assert err.count("\n") == 1
    assert main(["evaluate", str(tmp_path / "export"), "--data-dir", str(tmp_path / "other")]) == 2
    assert ("the data has 4 classes, the exported network predicts 3: is --data-dir the data set the run "
            "searched on?") in capsys.readouterr().err

"""The end-to-end search on the embedded digits: run directory, reproducibility, resume, ranking."""
from __future__ import annotations

import json
import re
import shutil
import statistics

import pytest
import torch
from conftest import SMALL, same_run_files, small_config

import pgnas_fast as pf
from pgnas_fast import configs
from pgnas_fast.data import DataError, load_digits
from pgnas_fast.nn import candidate_masks, gated_layers, posterior_of, set_gates
from pgnas_fast.search import RunError, accuracy, best_candidate, run_search
from pgnas_fast.search import run as run_module
from pgnas_fast.search.io import read_jsonl
from pgnas_fast.search.run import (RUN_FILES, build_supernet, evaluation_layout, load_data, load_run,
                                  rebuild_for_evaluation)
from pgnas_fast.search.train import learning_rate, regularizer_weight


def test_run_directory_holds_every_file(finished_run):
    out, result = finished_run
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp")), "atomic writes left temporary files"
    assert json.loads((out / "config.json").read_text()) == {"config": small_config(), "seed": 3}
    rows = read_jsonl(out / "candidates.jsonl")
    assert [r["id"] for r in rows] == list(range(SMALL["candidates"]))
    assert all(set(r) == {"id", "score", "images", "first_round_score", "kept_fraction"} for r in rows)
    assert all(r["images"] == 300 for r in rows)  # the digits preset ranks exhaustively
    assert all(r["first_round_score"] == r["score"] for r in rows)  # (its one round)
    assert all(0.0 <= r["score"] <= 1.0 and 0.0 < r["kept_fraction"] <= 1.0 for r in rows)
    assert len(read_jsonl(out / "random_candidates.jsonl")) == SMALL["random_baseline"]
    assert [r["epoch"] for r in read_jsonl(out / "train_log.jsonl")] == [1, 2]


def test_best_checkpoint_and_tensorboard_scalars(finished_run):
    out, _ = finished_run
    log = read_jsonl(out / "train_log.jsonl")
    best = torch.load(out / "checkpoint-best.pt", weights_only=False)
    assert best["loss"] == min(row["loss"] for row in log)
    assert log[best["epoch"] - 1]["loss"] == best["loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "cross_entropy", "regularizer", "train_accuracy", "lr", "images_per_second", "mean_p"} <= tags
    assert any(tag.startswith("mean_p_per_layer/") for tag in tags)
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([row["loss"] for row in log])


def test_report_ties_the_figures_to_the_summary(finished_run):
    out, result = finished_run
    report = (out / "report.md").read_text()
    arch = json.loads((out / "architecture.json").read_text())
    assert report.startswith("# PGNAS search: digits-tiny, seed 3")
    assert f"| chosen candidate | {arch['candidate']}," in report
    assert f"| test accuracy | {100 * arch['test_accuracy']:.2f}% (no fine-tuning) |" in report
    for png in ("p_per_layer.png", "kept_per_layer.png", "candidate_scores.png", "training.png"):
        assert f"]({png})" in report and (out / png).read_bytes()[:4] == b"\x89PNG"
    summary = result.summary
    assert summary["params_subnet"] < summary["params_all_channels"] < summary["params_supernet"] == 35670
    assert summary["macs_subnet"] < summary["macs_all_channels"]
    assert (f"| materialized network | {summary['params_subnet']:,} parameters "
            f"({summary['params_subnet'] / summary['params_all_channels']:.0%} of the "
            f"{summary['params_all_channels']:,} with every channel kept), {summary['macs_subnet']:,} MACs per image "
            f"({summary['macs_subnet'] / summary['macs_all_channels']:.0%} of {summary['macs_all_channels']:,}); the "
            "super-network's count adds its drop logits") in report
    assert (arch["params"], arch["macs"]) == (summary["params_subnet"], summary["macs_subnet"])
    assert summary["budget"] is None and "size budget" not in report
    # what defines the run: its regulariser's settings and where it ran
    config = small_config()
    assert (f"| posterior | concrete: concrete dropout; l^2 (weight_reg) {config['weight_reg']:g}, drop_reg "
            f"{config['drop_reg']:g}, N = {summary['data']['train']}, tau {config['tau']:g} |") in report
    assert summary["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (f"| backend | {summary['backend']} (1 CPU thread), pgnas_fast {pf.__version__}, torch {torch.__version__}, "
            f"CPU kernels {summary['cpu_capability']} |" in report)
    assert summary["tied_for_best"] >= 1 and "loss = cross-entropy + regulariser, unweighted" in report


def test_every_report_row_reads_its_own_summary_key(finished_run, tmp_path):
    """Each row of report.md from its own key, with values set apart so that no row can show another's:
    held-out vs test, ranking vs training seconds, the preset's N, the tie and first-share notes only
    when they hold, and the paper row's error (not accuracy)."""
    from pgnas_fast.search.report import PAPER_ERROR, percent, write_report

    out, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)

    def report(arch_edits=None, summary_edits=None, config_edits=None):
        for name, edits in (("architecture.json", arch_edits), ("summary.json", summary_edits)):
            data = json.loads((run / name).read_text())
            (run / name).write_text(json.dumps({**data, **(edits or {})}))
        config = json.loads((run / "config.json").read_text())
        config["config"].update(config_edits or {})
        (run / "config.json").write_text(json.dumps(config))
        return write_report(run).read_text()

    text = report({"score": 0.9111, "test_accuracy": 0.8222},
                  {"supernet_heldout_accuracy": 0.7333, "supernet_test_accuracy": 0.6444, "train_seconds": 11.1,
                   "rank_seconds": 22.2, "tied_for_best": 1, "mean_heldout_images": 300,
                   "finalist_heldout_images": 300, "guided_mean_heldout_accuracy": 0.5,
                   "random_mean_heldout_accuracy": 0.25}, {"n_train": 5e5})
    assert f"| held-out accuracy | {percent(0.9111)} |" in text
    assert f"| test accuracy | {percent(0.8222)} (no fine-tuning) |" in text
    assert f"| super-network, every channel kept | held-out {percent(0.7333)}, test {percent(0.6444)} |" in text
    assert "| posterior training | 2 epochs, 11.1 s |" in text and ", 22.2 s (" in text
    assert "N = 500000," in text
    assert "finalists tied" not in text and "racing's first share" not in text
    text = report(summary_edits={"tied_for_best": 3, "mean_heldout_images": 19})
    assert "(3 finalists tied at its held-out score" in text
    assert "at the same expected drop rate, over the first 19 held-out images (racing's first share) |" in text
    preset = next(iter(PAPER_ERROR))
    text = report({"preset": preset})
    assert f"this run {100 * (1 - 0.8222):.2f}%" in text


def test_architecture_names_the_best_candidate(finished_run):
    out, result = finished_run
    arch = json.loads((out / "architecture.json").read_text())
    rows = read_jsonl(out / "candidates.jsonl")
    best = best_candidate(rows)
    assert arch["candidate"] == best["id"] and arch["score"] == best["score"]
    assert max(r["score"] for r in rows) == arch["score"]
    assert arch["preset"] == "digits-tiny" and arch["seed"] == 3
    assert arch["test_accuracy"] == result.summary["test_accuracy"]
    kept = sum(len(layer["kept_channels"]) for layer in arch["layers"])
    assert kept / sum(layer["in_channels"] for layer in arch["layers"]) == pytest.approx(arch["kept_fraction"])
    assert all(len(layer["p"]) == len(layer["gate_groups"]) for layer in arch["layers"])


def test_every_reader_of_a_run_evaluates_in_its_layout(finished_run):
    """digits-tiny evaluates channels_last: load_run's network (what rank, study and export score)
    has channels_last conv weights; a config without it keeps them contiguous."""
    out, _ = finished_run
    model = load_run(out).model
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)
    evaluation_layout(model, small_config(channels_last=False))
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_best_candidate_rescores_from_the_checkpoint(finished_run):
    """The checkpoint, the seed and the candidate id alone reproduce the reported accuracies."""
    out, _ = finished_run
    arch = json.loads((out / "architecture.json").read_text())
    config = small_config()
    splits = load_data(config)
    weights = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    model = rebuild_for_evaluation(config, splits.num_classes, weights)
    masks = candidate_masks(model, 3, arch["candidate"])
    for (name, _), layer in zip(gated_layers(model), arch["layers"]):
        assert torch.nonzero(masks[name]).flatten().tolist() == layer["kept_channels"]
    set_gates(model, "hard", masks=masks)
    assert accuracy(model, [splits.heldout]) == arch["score"]  # one batch: the held-out split whole
    assert accuracy(model, [splits.test]) == arch["test_accuracy"]


def test_same_seed_gives_byte_identical_architecture(finished_run, tmp_path):
    out, _ = finished_run
    run_search(small_config(), seed=3, out_dir=tmp_path, progress=False)
    same_run_files(tmp_path, out)


def test_another_seed_gives_another_search(finished_run, tmp_path):
    out, _ = finished_run
    run_search(small_config(), seed=4, out_dir=tmp_path, progress=False)
    assert read_jsonl(tmp_path / "train_log.jsonl")[0]["loss"] != read_jsonl(out / "train_log.jsonl")[0]["loss"]
    assert (tmp_path / "candidates.jsonl").read_bytes() != (out / "candidates.jsonl").read_bytes()


def test_resume_after_a_kill_equals_an_uninterrupted_run(finished_run, tmp_path, monkeypatch):
    out, _ = finished_run
    real_save = run_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if path.name == "checkpoint.pt":  # (not checkpoint-best.pt, written just before it)
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(run_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_search(small_config(), seed=3, out_dir=tmp_path, progress=False)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "train_log.jsonl")] == [1]
    assert not (tmp_path / "architecture.json").exists()
    monkeypatch.setattr(run_module, "save_checkpoint", real_save)
    result = run_search(small_config(), seed=3, out_dir=tmp_path, resume=True, progress=False)
    same_run_files(tmp_path, out)
    # the reported training time counts the epoch trained before the kill too
    epochs = [row["seconds"] for row in read_jsonl(tmp_path / "train_log.jsonl")]
    assert len(epochs) == 2 and min(epochs) > 0 and result.summary["train_seconds"] == pytest.approx(sum(epochs))
    assert (result.summary["resumed_from_epoch"], result.summary["epochs"]) == (1, 2)  # (said with that time)
    assert finished_run[1].summary["resumed_from_epoch"] == 0


def test_a_resumed_run_s_checkpoints_are_an_uninterrupted_run_s_bytes(tmp_path, monkeypatch):
    """Not only their contents: pickle writes an equal string once or twice as it is one object or two,
    and a resume's load_state_dict gives the optimizer's settings keys objects of their own."""
    config = small_config(epochs=3, candidates=2, random_baseline=0)
    run_search(config, seed=3, out_dir=tmp_path / "whole", progress=False)
    real_save = run_module.save_checkpoint
    saves = []

    def save_then_die_at_the_second(path, state):
        real_save(path, state)
        saves.append(path.name)
        if saves.count("checkpoint.pt") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "save_checkpoint", save_then_die_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, seed=3, out_dir=tmp_path / "resumed", progress=False)
    monkeypatch.setattr(run_module, "save_checkpoint", real_save)
    run_search(config, seed=3, out_dir=tmp_path / "resumed", resume=True, progress=False)
    for name in ("checkpoint.pt", "checkpoint-best.pt", "architecture.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


@pytest.mark.parametrize("ranking", ["guided", "random"])
def test_resume_during_ranking_scores_nothing_twice(finished_run, tmp_path, monkeypatch, ranking):
    """Killed inside the guided ranking or the random baseline's, after one finished chunk: the resumed
    search scores only the unfinished chunk, and its files equal an uninterrupted run's."""
    from pgnas_fast.ops import Domain
    from pgnas_fast.search import rank as rank_module

    domain = {"guided": Domain.CANDIDATE, "random": Domain.RANDOM_CANDIDATE}[ranking]
    real_correct = rank_module.CandidateScorer.correct
    calls = []

    def recording(die_at):
        def correct(self, candidates, start, end):
            if self.domain == domain:
                calls.append(list(candidates))
                if len(calls) == die_at:
                    raise KeyboardInterrupt  # killed while ranking, after one finished chunk
            return real_correct(self, candidates, start, end)
        return correct

    # two chunks of 64 and 36 candidates
    config = small_config(**{"candidates" if ranking == "guided" else "random_baseline": 100})
    monkeypatch.setattr(rank_module.CandidateScorer, "correct", recording(die_at=2))
    with pytest.raises(KeyboardInterrupt):
        run_search(config, seed=3, out_dir=tmp_path, progress=False)
    assert not (tmp_path / "candidates.jsonl").exists()
    first_chunk = calls[0]
    calls.clear()
    monkeypatch.setattr(rank_module.CandidateScorer, "correct", recording(die_at=None))
    run_search(config, seed=3, out_dir=tmp_path, resume=True, progress=False)
    assert len(first_chunk) == 64 and calls == [list(range(64, 100))]  # only the unfinished chunk
    monkeypatch.setattr(rank_module.CandidateScorer, "correct", real_correct)
    fresh = tmp_path / "fresh"
    run_search(config, seed=3, out_dir=fresh, progress=False)
    same_run_files(tmp_path, fresh)


def test_resume_refuses_another_config(finished_run, tmp_path):
    """...and says which setting changed."""
    out, _ = finished_run
    (tmp_path / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    with pytest.raises(RunError, match=r"another config or seed: lr 0\.05 \(now 0\.01\)\. Resume"):
        run_search(small_config(lr=0.01), seed=3, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(RunError, match=r"another config or seed: seed 3 \(now 4\)\. Resume with the same ones$"):
        run_search(small_config(), seed=4, out_dir=tmp_path, resume=True, progress=False)
    # settings of the ranking alone: `rank` takes them without training again
    with pytest.raises(RunError, match=re.escape(
            "candidates 6 (now 9); max_macs 0 (now 500000). Resume with the same ones; these are ranking settings: "
            f"once the search has finished, `pgnas-fast rank {tmp_path} --candidates 9 --max-macs 500000` ranks its "
            "posterior with them, without training again")):
        run_search(small_config(candidates=9, max_macs=500_000), seed=3, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(RunError, match=re.escape("racing_eta 4 (now 3); ranking 'exhaustive' (now 'racing'). Resume "
                                                 f"with the same ones; these are ranking settings: once the search has "
                                                 f"finished, `pgnas-fast rank {tmp_path} --eta 3 --strategy racing`")):
        run_search(small_config(ranking="racing", racing_eta=3), seed=3, out_dir=tmp_path, resume=True,
                   progress=False)
    # with a training setting among them, or racing's settings for an exhaustive ranking: no such advice
    for changes in ({"candidates": 9, "lr": 0.01}, {"racing_eta": 3}):
        with pytest.raises(RunError, match=r"Resume with the same ones$"):
            run_search(small_config(**changes), seed=3, out_dir=tmp_path, resume=True, progress=False)


def test_a_run_of_an_older_version_resumes_and_reads_with_newer_config_keys(finished_run, tmp_path):
    """A config key added after a run was written (max_params, max_macs here) counts at its default, which
    that version ran with: its search resumes and rank reads both checkpoints; a real change is still named."""
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    older = json.loads((run / "config.json").read_text())
    for key in ("max_params", "max_macs"):
        del older["config"][key]
    (run / "config.json").write_text(json.dumps(older))
    for name in ("checkpoint.pt", "checkpoint-best.pt"):
        state = torch.load(run / name, weights_only=False)
        state["run_config"] = older
        torch.save(state, run / name)
    assert load_run(run, checkpoint="best").epoch == 2
    result = run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)
    assert result.summary["resumed_from_epoch"] == 2
    assert json.loads((run / "config.json").read_text())["config"]["max_params"] == 0  # this version's config now
    assert load_run(run, checkpoint="best").epoch == 2  # (its best checkpoint still the older version's)
    with pytest.raises(RunError, match=r"another config or seed: max_params 0 \(now 1000000000\)\. Resume"):
        run_search(small_config(max_params=10**9), seed=3, out_dir=run, resume=True, progress=False)


def test_resume_refuses_another_number_of_processes(finished_run, tmp_path):
    out, _ = finished_run
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["world_size"] == 1
    shutil.copytree(out, tmp_path / "run")
    torch.save({**state, "world_size": 2, "epoch": state["epoch"] - 1}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(RunError, match=r"trained by 2 process\(es\), this resume runs 1.*\(WORLD_SIZE 2\)"):
        run_search(small_config(), seed=3, out_dir=tmp_path / "run", resume=True, progress=False)
    # with its epochs trained, only ranking is left, whose table is the same at any count
    torch.save({**state, "world_size": 2}, tmp_path / "run" / "checkpoint.pt")
    run_search(small_config(), seed=3, out_dir=tmp_path / "run", resume=True, progress=False)
    same_run_files(tmp_path / "run", out)


def test_resume_names_a_missing_or_damaged_training_log(finished_run, tmp_path):
    out, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    torch.save({**state, "epoch": state["epoch"] - 1}, run / "checkpoint.pt")  # an epoch left to train
    log = (run / "train_log.jsonl").read_text()
    (run / "train_log.jsonl").write_text(log[:-10])  # the last row cut
    with pytest.raises(RunError, match=r"train_log\.jsonl' is missing or damaged \(.*restore it, or start"):
        run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)
    (run / "train_log.jsonl").write_text("")
    with pytest.raises(RunError, match=rf"holds 0 epoch\(s\), but the checkpoint is of epoch {state['epoch'] - 1}"):
        run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)
    (run / "train_log.jsonl").unlink()
    with pytest.raises(RunError, match="is missing or damaged"):
        run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)


def test_resume_on_another_backend_says_the_rest_will_drift(finished_run, tmp_path, capsys):
    from pgnas_fast.ops import dispatch

    out, result = finished_run
    assert result.summary["backend"] == dispatch.resolve(None, torch.device("cpu"))
    run = tmp_path / "run"
    shutil.copytree(out, run)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    torch.save({**state, "epoch": state["epoch"] - 1, "backend": "triton"}, run / "checkpoint.pt")
    run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)
    assert (f"was trained on the triton backend, this resume trains on {result.summary['backend']}: its sums round "
            "in another order") in capsys.readouterr().err
    # the CPU thread count likewise (torch's CPU BatchNorm and weight-gradient sums split by thread)
    assert state["threads"] == result.summary["threads"] == small_config()["threads"] == 1
    assert "(1 CPU thread)" in (out / "report.md").read_text()
    torch.save({**state, "epoch": state["epoch"] - 1, "threads": 2}, run / "checkpoint.pt")
    run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)
    assert ("was trained with 2 CPU thread(s), this resume with 1 (--set threads=N pins the count): its sums round "
            "in another order") in capsys.readouterr().err
    torch.save({**state, "epoch": state["epoch"] - 1}, run / "checkpoint.pt")
    run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)
    assert "note:" not in capsys.readouterr().err
    # a checkpoint from before the epoch order came from the RNG contract (it holds no order_version)
    assert state["order_version"] == 2
    torch.save({k: v for k, v in state.items() if k != "order_version"} | {"epoch": state["epoch"] - 1},
               run / "checkpoint.pt")
    run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)
    assert ("was trained with an older pgnas_fast's order of the training images (before it came from the RNG "
            "contract)") in capsys.readouterr().err
    torch.save({k: v for k, v in state.items() if k != "order_version"}, run / "checkpoint.pt")  # nothing left
    run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)
    assert "note:" not in capsys.readouterr().err
    # a finished run resumed on another backend trains nothing: its summary names what trained it
    torch.save({**state, "backend": "triton", "threads": 2}, run / "checkpoint.pt")
    resumed = run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)
    assert (resumed.summary["backend"], resumed.summary["threads"]) == ("triton", 2)
    assert "note:" not in capsys.readouterr().err


def test_a_second_writer_of_a_run_is_refused(finished_run, tmp_path, capsys):
    """While one process writes a run (e.g. a killed torchrun's workers, which outlive their launcher),
    a resume of it, or a ranking under the tag being written, is refused, on every rank; the lock goes
    with its holder."""
    from pgnas_fast.cli import main
    from pgnas_fast.search.io import writer_lock
    from pgnas_fast.search.parallel import SINGLE_PROCESS

    out, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    with writer_lock(run, "search", SINGLE_PROCESS):
        with pytest.raises(RunError, match=r"another pgnas-fast process is writing search in '.*run': wait for it"):
            run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)
        assert main(["rank", str(run), "--candidates", "2", "--tag", "t", "--quiet"]) == 0  # another writer's files
    with writer_lock(run, "rank-t", SINGLE_PROCESS):
        assert main(["rank", str(run), "--candidates", "2", "--tag", "t", "--quiet"]) == 2
        assert "another pgnas-fast process is writing rank-t in" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file() and path.name in before} == before
    run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)  # released


def test_a_fresh_search_leaves_a_running_rank_or_study_s_folder_alone(finished_run, tmp_path):
    """A fresh search replaces the old run and removes its rank-*/, study-*/, train-*/ and correlate-*/
    results: not while the command writes one (it would crash on its vanished files)."""
    from pgnas_fast.search.io import writer_lock
    from pgnas_fast.search.parallel import SINGLE_PROCESS
    from pgnas_fast.search.study import run_study

    out, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    for tag in ("rank-live", "study-live", "train-live", "correlate-live"):
        (run / tag).mkdir()
        with writer_lock(run, tag, SINGLE_PROCESS):
            with pytest.raises(RunError, match=f"a pgnas-fast rank, study, train or correlate is writing {tag} in .*, which a"):
                run_search(small_config(), seed=5, out_dir=run, overwrite=True, progress=False)
            assert (run / tag).is_dir() and (run / "checkpoint.pt").read_bytes() == (out / "checkpoint.pt").read_bytes()
    with writer_lock(run, "study-live", SINGLE_PROCESS):  # a study takes the lock of its tag
        with pytest.raises(RunError, match="another pgnas-fast process is writing study-live in"):
            run_study(run, candidates=2, tag="live", progress=False)
    run_search(small_config(), seed=5, out_dir=run, overwrite=True, progress=False)  # nobody writes them now: removed
    assert not any((run / tag).exists() for tag in ("rank-live", "study-live", "train-live", "correlate-live"))


def test_a_killed_writer_s_lock_is_free_while_its_forked_children_live(tmp_path):
    """A DataLoader worker forked by a search shares its lock file; killed with -9, the search leaves the
    worker alive for a few seconds, and an immediate --resume must not be refused because of it."""
    import os
    import signal
    import subprocess
    import sys

    from pgnas_fast.search.io import writer_lock
    from pgnas_fast.search.parallel import SINGLE_PROCESS

    script = f"""
import os, signal, sys, time
from pathlib import Path
from pgnas_fast.search.io import writer_lock
from pgnas_fast.search.parallel import SINGLE_PROCESS
with writer_lock(Path({str(tmp_path)!r}), "search", SINGLE_PROCESS):
    child = os.fork()
    if child == 0:  # (off the pipes the test reads to their end)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    child = int(result.stdout.split()[0])
    try:
        os.kill(child, 0)  # the forked child still lives
        with writer_lock(tmp_path, "search", SINGLE_PROCESS):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_ctrl_c_during_a_checkpoint_write_is_taken_once_the_file_is_whole(tmp_path, monkeypatch):
    """torch.save interrupted mid-file raised its own error from its cleanup ("unexpected pos ...") or
    aborted the process, instead of the KeyboardInterrupt whose message says how to resume: the
    interrupt now waits for the write, which ends whole."""
    import os
    import signal

    from pgnas_fast.search.io import save_checkpoint

    state = {"model": {"w": torch.randn(64, 64)}, "epoch": 3}
    real_save = torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands here, mid-write
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "checkpoint.pt", state)
    monkeypatch.undo()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 3 and torch.equal(saved["model"]["w"], state["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_resume_removes_the_temporaries_of_writes_a_kill_cut(finished_run, tmp_path):
    out, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    cut = [run / ".checkpoint.pt.k2x_9abc.tmp", run / ".summary.json.Zq81mmp0.tmp"]  # (mkstemp's names)
    kept = [run / ".notes.tmp", run / "draft.tmp", run / ".checkpoint.pt.short.tmp"]  # not _atomic_write's
    for path in cut + kept:
        path.write_bytes(b"partial")
    run_search(small_config(), seed=3, out_dir=run, resume=True, progress=False)
    assert not any(path.exists() for path in cut) and all(path.exists() for path in kept)


def test_bad_data_met_after_training_began_says_the_run_resumes(tmp_path, capsys, monkeypatch):
    """ImageNet's files are first read when a loader reaches them: a corrupt held-out image stops a search
    after its checkpoints are written, and the one-line error says that --resume continues it."""
    from pgnas_fast.cli import main

    def corrupt(*args, **kwargs):
        raise DataError("val/n01/x.JPEG is not a readable image")

    monkeypatch.setattr(run_module, "rank_candidates", corrupt)
    argv = ["search", "--epochs", "1", "--set", "candidates=2", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == ("pgnas-fast: error: val/n01/x.JPEG is not a readable image; the run so far is kept: replace the "
                   "unreadable file with a readable one of the same name and run the same command with --resume (with "
                   "files removed or added the data is another: --overwrite starts afresh)\n")
    monkeypatch.setattr(run_module, "rank_candidates", corrupt)
    assert main(argv + ["--resume"]) == 2  # (the checkpoint is the earlier command's: no hint to resume again)
    assert "the run so far is kept" not in capsys.readouterr().err


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    run_search(small_config(candidates=2, random_baseline=0), seed=3, out_dir=tmp_path / "new", resume=True,
               progress=False)
    assert "nothing to resume in" in capsys.readouterr().err
    assert (tmp_path / "new" / "architecture.json").is_file()


def test_a_resumed_search_reports_no_rate_for_work_it_did_not_time(finished_run, tmp_path):
    """Resuming a finished search ranks nothing: its summary says the progress logs held every
    evaluation instead of a candidates/s of this process."""
    out, result = finished_run
    summary = result.summary
    shutil.copytree(out, tmp_path / "run")
    resumed = run_search(small_config(), seed=3, out_dir=tmp_path / "run", resume=True, progress=False).summary
    assert summary["resumed_evaluations"] == 0 and summary["candidates_per_second"] > 0
    assert resumed["candidates_per_second"] is None
    assert resumed["resumed_evaluations"] == summary["candidates"] + summary["random_candidates"]  # exhaustive
    assert "resumed: " in (tmp_path / "run" / "report.md").read_text()


def test_digits_refuses_a_data_dir(finished_run, tmp_path, capsys):
    """search and every reader of a digits run (rank, study, export read it through load_run or
    load_data) refuse a --data-dir, which they would ignore."""
    from pgnas_fast.cli import main

    finished_run, _ = finished_run
    with pytest.raises(DataError, match="digits data set is embedded.*leave --data-dir out"):
        run_search(small_config(), seed=3, out_dir=tmp_path / "run", data_dir=tmp_path, progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match="digits data set is embedded"):
        load_run(finished_run, data_dir=tmp_path)
    for argv in (["rank", str(finished_run), "--candidates", "2"], ["study", str(finished_run)],
                 ["export", str(finished_run), "--out", str(tmp_path / "export")]):
        assert main([*argv, "--data-dir", str(tmp_path)]) == 2, argv
        assert "digits data set is embedded" in capsys.readouterr().err
    assert not (tmp_path / "export").exists() and not (finished_run / "rank-default").exists()


def test_fresh_run_replaces_an_old_run_whole(finished_run, tmp_path):
    (tmp_path / "random_candidates.jsonl").write_text("stale\n")
    (tmp_path / "tensorboard").mkdir()
    stale_events = tmp_path / "tensorboard" / "events.out.tfevents.0.stale"
    stale_events.write_bytes(b"old run")
    with pytest.raises(RunError, match="holds a run .trained 0 epochs, not finished.: --resume continues it"):
        run_search(small_config(random_baseline=0), seed=3, out_dir=tmp_path, progress=False)
    assert (tmp_path / "random_candidates.jsonl").read_text() == "stale\n"  # (refused: nothing changed)
    run_search(small_config(random_baseline=0), seed=3, out_dir=tmp_path, overwrite=True, progress=False)
    assert not (tmp_path / "random_candidates.jsonl").exists() and not stale_events.exists()


def test_smoke_runs_the_pipeline_on_a_handful_of_batches(tmp_path):
    config = configs.resolve("digits-tiny", {"eval_batch_size": 50})
    result = run_search(config, seed=0, out_dir=tmp_path, smoke=True, progress=False)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "train_log.jsonl")] == [1]
    assert len(read_jsonl(tmp_path / "candidates.jsonl")) == run_module.SMOKE_CANDIDATES
    # scores come from SMOKE_EVAL_BATCHES batches of 50 held-out images
    assert all(abs(r["score"] * 100 - round(r["score"] * 100)) < 1e-9 for r in read_jsonl(tmp_path / "candidates.jsonl"))
    assert result.summary["candidates"] == 2
    assert result.summary["smoke"] == {"training_steps": 2, "heldout": 100, "test": 100}
    # the random baseline is capped too, and a one-epoch run still keeps its best checkpoint
    assert config["random_baseline"] > run_module.SMOKE_CANDIDATES
    assert len(read_jsonl(tmp_path / "random_candidates.jsonl")) == run_module.SMOKE_CANDIDATES
    assert result.summary["random_candidates"] == run_module.SMOKE_CANDIDATES
    for name in RUN_FILES:
        assert (tmp_path / name).is_file(), name
    assert torch.load(tmp_path / "checkpoint-best.pt", weights_only=False)["epoch"] == 1


def test_digits_splits_are_disjoint_stratified_and_fixed():
    a = load_digits(test=360, heldout=300, split_seed=0)
    b = load_digits(test=360, heldout=300, split_seed=0)
    assert a.sizes() == {"train": 1137, "heldout": 300, "test": 360}
    assert torch.equal(a.heldout[0], b.heldout[0]) and torch.equal(a.test[1], b.test[1])
    rows = {split: {tuple(x.flatten().tolist()) for x in getattr(a, split)[0]} for split in ("train", "heldout", "test")}
    # the digits set has a few duplicate images, so compare overlaps to the duplicates' scale, not zero
    assert len(rows["train"] & rows["test"]) < 5 and len(rows["heldout"] & rows["test"]) < 5
    for split in (a.heldout, a.test):
        counts = torch.bincount(split[1], minlength=10).float()
        assert counts.min() >= counts.max() - 2, "stratified: every class equally represented (+-1)"
    assert a.train[0].mean().abs() < 1e-4 and (a.train[0].std() - 1).abs() < 1e-3
    with pytest.raises(ValueError, match="no training set"):
        load_digits(test=1000, heldout=900, split_seed=0)


def test_supernet_shapes_and_gates():
    config = configs.resolve("digits-tiny")
    model = build_supernet(config, 10)
    layers = gated_layers(model)
    assert len(layers) == 11  # 3 blocks x 3 branches, one projection shortcut, the classifier
    assert sum(layer.p_logit.numel() for _, layer in layers) == 60
    assert all(torch.allclose(layer.p, torch.tensor(0.1)) for _, layer in layers)
    model.eval()
    set_gates(model, "full")
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


@pytest.mark.slow
def test_guided_candidates_beat_random_gates_on_three_seeds(tmp_path):
    """The paper's Table 3 effect on digits with the default preset: mean held-out accuracy of the
    guided candidates above random gates at the same expected drop rate, on 3 of 3 seeds."""
    config = configs.resolve("digits-tiny", {"candidates": 100, "random_baseline": 100})
    margins = []
    for seed in (0, 1, 2):
        s = run_search(config, seed=seed, out_dir=tmp_path / str(seed), progress=False).summary
        assert s["random_kept_fraction"] == pytest.approx(s["guided_mean_kept_fraction"], abs=0.03)
        margins.append(s["guided_mean_heldout_accuracy"] - s["random_mean_heldout_accuracy"])
    assert all(m > 0 for m in margins), margins
    assert statistics.fmean(margins) > 0.02, margins


# ---- the Gaussian posterior family ----------------------------------------------------------------
@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gaussian")
    result = run_search(small_config(posterior="gaussian", kl_warmup_epochs=1), seed=3, out_dir=out, progress=False)
    return out, result


def test_the_run_records_its_posterior_family(finished_run, gaussian_run):
    for (out, result), family in ((finished_run, "concrete"), (gaussian_run, "gaussian")):
        assert json.loads((out / "architecture.json").read_text())["posterior"] == family
        assert result.summary["posterior"] == family
        assert f"| posterior | {family}: " in (out / "report.md").read_text()
    out, _ = gaussian_run
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert (out / "candidates.jsonl").read_bytes() != (finished_run[0] / "candidates.jsonl").read_bytes()


def test_gaussian_training_logs_the_kl_and_its_warm_up(gaussian_run):
    out, _ = gaussian_run
    log = read_jsonl(out / "train_log.jsonl")
    steps = -(-1137 // 64)  # digits: 1137 training images in batches of 64, the last one short
    # the weight at each epoch's last step: linear over the first epoch, then 1
    assert [row["regularizer_weight"] for row in log] == [pytest.approx((steps - 1) / steps), 1.0]
    assert all(row["regularizer"] > 0 and row["loss"] == pytest.approx(row["cross_entropy"] + row["regularizer"])
               for row in log)


def test_kl_warm_up_is_linear_per_step():
    config = configs.resolve("digits-tiny", {"kl_warmup_epochs": 2.5})
    assert [regularizer_weight(config, step, 10) for step in (0, 5, 12, 24, 25, 26, 1000)] == pytest.approx(
        [0.0, 0.2, 0.48, 0.96, 1.0, 1.0, 1.0])
    assert regularizer_weight(configs.resolve("digits-tiny"), 0, 10) == 1.0  # no warm-up by default


def test_a_gaussian_run_reloads_as_gaussian_and_rescores(gaussian_run):
    out, _ = gaussian_run
    loaded = load_run(out)
    assert posterior_of(loaded.model) == "gaussian"
    arch = json.loads((out / "architecture.json").read_text())
    masks = candidate_masks(loaded.model, 3, arch["candidate"])
    for (name, layer), record in zip(gated_layers(loaded.model), arch["layers"]):
        assert torch.nonzero(masks[name]).flatten().tolist() == record["kept_channels"]
        assert record["p"] == pytest.approx(torch.sigmoid(layer.p_logit.detach()).tolist())
    set_gates(loaded.model, "hard", masks=masks)
    assert accuracy(loaded.model, loaded.feed.eval_batches("heldout")) == arch["score"]


def test_a_checkpoint_never_loads_as_the_other_family(gaussian_run, tmp_path):
    import shutil

    out, _ = gaussian_run
    shutil.copytree(out, tmp_path / "run")
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    run_config["config"]["posterior"] = "concrete"
    (tmp_path / "run" / "config.json").write_text(json.dumps(run_config))
    with pytest.raises(RunError, match="was trained with the gaussian posterior, but the config asks for concrete"):
        load_run(tmp_path / "run")
    with pytest.raises(RunError, match="was trained with the gaussian posterior"):
        run_search(small_config(), seed=3, out_dir=tmp_path / "run", resume=True, progress=False)


@pytest.mark.slow
def test_gaussian_guided_candidates_beat_random_gates_on_three_seeds(tmp_path):
    """The Table 3 effect with the Gaussian family: its learned drop rates guide the candidates as
    well, on 3 of 3 seeds."""
    config = configs.resolve("digits-tiny", {"posterior": "gaussian", "candidates": 100, "random_baseline": 100})
    margins = []
    for seed in (0, 1, 2):
        s = run_search(config, seed=seed, out_dir=tmp_path / str(seed), progress=False).summary
        assert s["posterior"] == "gaussian"
        assert s["random_kept_fraction"] == pytest.approx(s["guided_mean_kept_fraction"], abs=0.03)
        margins.append(s["guided_mean_heldout_accuracy"] - s["random_mean_heldout_accuracy"])
    assert all(m > 0 for m in margins), margins
    assert statistics.fmean(margins) > 0.02, margins


def test_a_run_older_than_the_posterior_families_loads_as_concrete(finished_run, tmp_path):
    import shutil

    out, _ = finished_run
    shutil.copytree(out, tmp_path / "run")
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    for key in ("posterior", "kl_warmup_epochs"):
        del run_config["config"][key]
    (tmp_path / "run" / "config.json").write_text(json.dumps(run_config))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    state["run_config"] = run_config
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    loaded = load_run(tmp_path / "run")
    assert posterior_of(loaded.model) == "concrete" and loaded.config["posterior"] == "concrete"


def test_a_three_epoch_run_s_best_checkpoint_logged_rates_and_regulariser_n(tmp_path, monkeypatch):
    """checkpoint-best.pt is the epoch of the lowest logged objective (here the middle one: neither the
    first nor the last), each epoch logs its last step's learning rate, and the config's n_train is
    the N of every step's regulariser."""
    from pgnas_fast.search import train as train_module

    real_train, real_regularizer = run_module.train_posterior, train_module.network_regularizer
    n_trains, feeds = set(), []

    def regularizer(*args, **kwargs):
        n_trains.add(kwargs["n_train"])
        return real_regularizer(*args, **kwargs)

    def train(*args, on_epoch_end, **kwargs):
        feeds.append(args[2])
        return real_train(*args, on_epoch_end=lambda epoch, stats: on_epoch_end(
            epoch, {**stats, "loss": [5.0, 3.0, 4.0][epoch - 1]}), **kwargs)

    monkeypatch.setattr(train_module, "network_regularizer", regularizer)
    monkeypatch.setattr(run_module, "train_posterior", train)
    config = small_config(epochs=3, candidates=2, random_baseline=0, n_train=12345)
    run_search(config, seed=0, out_dir=tmp_path, progress=False)
    best = torch.load(tmp_path / "checkpoint-best.pt", weights_only=False)
    assert (best["epoch"], best["loss"]) == (2, 3.0)
    steps = feeds[0].steps_per_epoch()
    assert [row["lr"] for row in read_jsonl(tmp_path / "train_log.jsonl")] == [
        learning_rate(config, (epoch + 1) * steps - 1, steps) for epoch in range(3)]
    assert n_trains == {12345}


def test_schedules():
    steps = 10  # per epoch
    cosine = configs.resolve("digits-tiny", {"epochs": 4, "lr": 0.4, "lr_min": 0.1})
    assert learning_rate(cosine, 0, steps) == pytest.approx(0.4)
    assert learning_rate(cosine, 20, steps) == pytest.approx(0.25)  # half way
    assert learning_rate(cosine, 40, steps) == pytest.approx(0.1)
    step = configs.resolve("imagenet-d121")
    assert [learning_rate(step, e * steps, steps) for e in (0, 89, 90, 149, 150, 179)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    sgdr = configs.resolve("cifar10-supnet-e")  # restarts after 10, 30, 70, 150, 310 epochs
    for restart in (0, 10, 30, 70, 150, 310):
        assert learning_rate(sgdr, restart * steps, steps) == pytest.approx(0.05)
        if restart:
            assert learning_rate(sgdr, restart * steps - 1, steps) < 0.0011
    assert learning_rate(sgdr, 20 * steps, steps) == pytest.approx(1e-4 + 0.5 * (0.05 - 1e-4))
    assert learning_rate(sgdr, 630 * steps - 1, steps) == pytest.approx(1e-4, abs=1e-6)


@pytest.mark.parametrize("preset", configs.names())
def test_every_preset_resolves_with_the_papers_numbers(preset):
    config = configs.resolve(preset)
    paper_l2 = {"cifar10-supnet-m": 50, "cifar10-supnet-mi": 150, "cifar100-supnet-mi": 2500, "cifar10-supnet-e": 0.1,
                "cifar10-supnet-ei": 0.1, "imagenet-d121": 100, "imagenet-r50": 80}
    if preset in paper_l2:
        assert config["weight_reg"] == paper_l2[preset]
        assert config["tau"] == 0.2 and config["p_init"] == 0.1 and config["drop_reg"] == 1.0
        assert config["n_train"] == (1281167.0 if preset.startswith("imagenet") else 5e5)


def test_an_auxiliary_weight_without_an_auxiliary_head_is_said(tmp_path, capsys):
    run_search(small_config(aux_weight=0.4), seed=3, out_dir=tmp_path / "aux", progress=False)
    assert ("note: aux_weight 0.4 set, but the digits-tiny super-network has no auxiliary head"
            in capsys.readouterr().err)
    run_search(small_config(), seed=3, out_dir=tmp_path / "plain", progress=False)
    assert "aux_weight" not in capsys.readouterr().err

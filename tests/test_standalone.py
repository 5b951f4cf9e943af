"""`pgnas-fast train`: one candidate trained alone (search/standalone.py), from its inherited weights or
from scratch, on the small digits search of conftest (seed 3)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import TIMINGS, small_config
from pgnas_fast.cli import main
from pgnas_fast.nn import candidate_masks, gated_layers, set_gates, set_step_streams
from pgnas_fast.nn.gated import _stochastic_modules
from pgnas_fast.ops.streams import stream_id
from pgnas_fast.search import standalone
from pgnas_fast.search.export import evaluate_export
from pgnas_fast.search.io import read_jsonl, writer_lock
from pgnas_fast.search.parallel import SINGLE_PROCESS
from pgnas_fast.search.run import RunError, build_supernet, load_run
from pgnas_fast.search.standalone import CHECKPOINT, train_candidate


@pytest.fixture
def run(finished_run, tmp_path):
    """A copy of the finished small search, to train in."""
    out, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy


def export_json(directory):
    return json.loads((directory / "export.json").read_text())


def trained_state(directory):
    return torch.load(directory / CHECKPOINT, map_location="cpu", weights_only=False)["model"]


def test_inherited_training_starts_at_the_search_s_numbers_and_exports_what_it_reports(run):
    """The untrained accuracies are the search's best candidate's (same candidate, gates and weights);
    the exported network scores what export.json reports."""
    arch = json.loads((run / "architecture.json").read_text())
    summary = train_candidate(run, epochs=2, progress=False)
    out = run / "train-inherited"
    assert summary == export_json(out)
    assert summary["candidate"] == arch["candidate"] and summary["init"] == "inherited"
    assert summary["inherited_test_accuracy"] == arch["test_accuracy"]
    assert summary["inherited_heldout_accuracy"] == arch["score"]
    assert (summary["epochs"], summary["checkpoint"], summary["training_seed"]) == (2, "last", 3)
    assert len(read_jsonl(out / "train_log.jsonl")) == 2
    assert evaluate_export(out) == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert evaluate_export(out, split="heldout") == pytest.approx(summary["heldout_accuracy"], abs=1e-6)
    # the exported architecture is the candidate's: the same kept channels as the search's record
    exported = json.loads((out / "architecture.json").read_text())
    assert [layer["kept_channels"] for layer in exported["layers"]] == [
        layer["kept_channels"] for layer in arch["layers"]]
    assert exported["seed"] == 3 and exported["candidate"] == arch["candidate"]


def test_only_the_candidate_s_weights_train(run):
    """Without weight decay, the weights of dropped input channels get no gradient and stay as inherited,
    the drop logits are frozen, and the kept channels' weights move."""
    train_candidate(run, candidate=1, epochs=1, weight_decay=0.0, tag="nodecay", progress=False)
    before = load_run(run).model
    masks = candidate_masks(before, 3, 1)
    after = trained_state(run / "train-nodecay")
    moved = 0
    for name, layer in gated_layers(before):
        kept = masks[name].bool()
        weight = after[f"{name}.weight"]
        assert torch.equal(weight[:, ~kept], layer.weight.detach()[:, ~kept]), name
        assert torch.equal(after[f"{name}.p_logit"], layer.p_logit.detach()), name
        moved += int(not torch.equal(weight[:, kept], layer.weight.detach()[:, kept]))
    assert moved == len(gated_layers(before))
    assert sum((~masks[name].bool()).sum().item() for name in masks) > 0  # the check above saw dropped channels


def test_weight_decay_is_applied(run):
    """With weight decay the dropped channels' weights (no gradient) shrink by exactly the decay's steps."""
    train_candidate(run, candidate=1, epochs=1, weight_decay=0.01, lr=0.05, tag="decay", progress=False)
    before = load_run(run).model
    masks = candidate_masks(before, 3, 1)
    after = trained_state(run / "train-decay")
    name, layer = next((n, m) for n, m in gated_layers(before) if not masks[n].bool().all())
    dropped = ~masks[name].bool()
    ratio = after[f"{name}.weight"][:, dropped] / layer.weight.detach()[:, dropped]
    assert (ratio < 1).all() and (ratio > 0.9).all()  # shrunk, uniformly: no gradient but the decay's
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-5)


def test_scratch_starts_from_the_search_s_initial_weights(run, monkeypatch):
    """--init scratch with the run's seed starts where `search --seed` started; another seed elsewhere."""
    starts = []
    real_train = standalone.train_posterior

    def capture(model, *args, **kwargs):
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(standalone, "train_posterior", capture)
    train_candidate(run, init="scratch", epochs=1, progress=False)
    train_candidate(run, init="scratch", epochs=1, seed=4, tag="seed4", progress=False)
    torch.manual_seed(3)
    initial = build_supernet(small_config(), 10).state_dict()
    assert starts[0].keys() == initial.keys()
    assert all(torch.equal(starts[0][k], initial[k]) for k in initial)
    assert not all(torch.equal(starts[1][k], initial[k]) for k in initial if k.endswith("weight"))
    summary = export_json(run / "train-scratch")
    arch = json.loads((run / "architecture.json").read_text())
    assert summary["inherited_test_accuracy"] == arch["test_accuracy"] and summary["training_seed"] == 3
    assert export_json(run / "train-seed4")["training_seed"] == 4


def test_a_seed_reproduces_a_training_and_a_resume_after_a_kill_equals_it(run, monkeypatch):
    whole = train_candidate(run, init="scratch", epochs=3, tag="whole", progress=False)
    real_save = standalone.save_checkpoint

    def die_before_the_second_checkpoint(path, state):
        if state["epoch"] == 2:
            raise KeyboardInterrupt  # killed after epoch 2's log row, before its checkpoint
        real_save(path, state)

    monkeypatch.setattr(standalone, "save_checkpoint", die_before_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_candidate(run, init="scratch", epochs=3, tag="cut", progress=False)
    assert len(read_jsonl(run / "train-cut" / "train_log.jsonl")) == 2  # one row more than the checkpoint's
    assert not (run / "train-cut" / "export.json").exists()
    monkeypatch.setattr(standalone, "save_checkpoint", real_save)
    with pytest.raises(RunError, match=r"holds a training \(trained 2 epochs, not finished\): --resume continues"):
        train_candidate(run, init="scratch", epochs=3, tag="cut", progress=False)
    resumed = train_candidate(run, init="scratch", epochs=3, tag="cut", resume=True, progress=False)
    a, b = trained_state(run / "train-whole"), trained_state(run / "train-cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def log(tag):
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in read_jsonl(run / tag / "train_log.jsonl")]

    assert log("train-whole") == log("train-cut") and len(log("train-whole")) == 3
    differ = {"resumed_from_epoch", "train_seconds"}
    assert {k: v for k, v in resumed.items() if k not in differ} == {k: v for k, v in whole.items() if k not in differ}
    assert (resumed["resumed_from_epoch"], whole["resumed_from_epoch"]) == (1, 0)
    logged = read_jsonl(run / "train-cut" / "train_log.jsonl")  # every epoch's time, those before the kill too
    assert resumed["train_seconds"] == pytest.approx(sum(row["seconds"] for row in logged))
    assert resumed["final_train_loss"] == logged[-1]["loss"] != logged[0]["loss"]
    assert "regularizer" not in log("train-whole")[0] and "mean_p" not in log("train-whole")[0]


def test_a_training_of_a_ranking_s_best_records_the_ranking(run):
    assert main(["rank", str(run), "--candidates", "4", "--tag", "r", "--quiet"]) == 0
    best = json.loads((run / "rank-r" / "summary.json").read_text())["best"]
    summary = train_candidate(run, rank_tag="r", epochs=1, progress=False)
    assert (summary["candidate"], summary["rank_tag"]) == (best["id"], "r")
    assert export_json(run / "train-inherited") == summary
    assert summary["inherited_heldout_accuracy"] == pytest.approx(best["score"], abs=1e-9)


def test_a_held_training_is_refused_without_resume_or_overwrite(run, monkeypatch, capsys):
    train_candidate(run, epochs=1, progress=False)
    with pytest.raises(RunError, match=r"holds a training \(finished\): --resume continues it, --overwrite replaces"):
        train_candidate(run, epochs=1, progress=False)
    with pytest.raises(RunError, match=r"was trained with other settings: epochs 1 \(now 2\)"):
        train_candidate(run, epochs=2, resume=True, progress=False)
    with pytest.raises(RunError, match=r"lr 0\.05 \(now 0\.01\)"):
        train_candidate(run, epochs=1, lr=0.01, resume=True, progress=False)
    out = run / "train-inherited"
    before = {name: (out / name).read_bytes() for name in (CHECKPOINT, "export.json", "subnet.pt")}
    with monkeypatch.context() as patched:  # finished: nothing trained, evaluated or exported again
        patched.setattr(standalone, "accuracy", lambda *a, **k: pytest.fail("a finished training was evaluated"))
        assert train_candidate(run, epochs=1, resume=True, progress=False) == export_json(out)
    assert "holds this training, finished: nothing to resume" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    with writer_lock(run, "train-inherited", SINGLE_PROCESS):  # (an --overwrite of it, say, under way)
        with pytest.raises(RunError, match="another pgnas-fast process is writing train-inherited"):
            train_candidate(run, epochs=1, resume=True, progress=False)
    (out / "export.json").write_text("{")  # a damaged export is written again from the finished checkpoint
    mended = train_candidate(run, epochs=1, resume=True, progress=False)
    assert mended == export_json(out) and mended["epochs"] == 1 and mended["resumed_from_epoch"] == 1
    assert (out / CHECKPOINT).read_bytes() == before[CHECKPOINT]
    train_candidate(run, epochs=2, overwrite=True, progress=False)
    assert len(read_jsonl(run / "train-inherited" / "train_log.jsonl")) == 2


def test_a_training_cut_before_its_first_checkpoint_is_held_and_a_short_log_refused(run, capsys):
    out = run / "train-inherited"
    out.mkdir()
    (out / "settings.json").write_text("{}")  # cut before the first epoch ended
    with pytest.raises(RunError, match=r"holds a training \(trained 0 epochs, not finished\)"):
        train_candidate(run, epochs=1, progress=False)
    train_candidate(run, epochs=1, tag="fresh", resume=True, progress=False)
    assert f"nothing to resume in {str(run / 'train-fresh')!r} (no {CHECKPOINT} yet): a new training starts" in (
        capsys.readouterr().err)
    train_candidate(run, epochs=2, tag="short", progress=False)
    (run / "train-short" / "export.json").unlink()
    (run / "train-short" / "train_log.jsonl").write_text("")
    with pytest.raises(RunError, match=f"train_log.jsonl' holds 0 epoch\\(s\\), but {CHECKPOINT} is of epoch 2: "
                                       r"restore it, or train afresh \(--overwrite\)"):
        train_candidate(run, epochs=2, tag="short", resume=True, progress=False)


def test_a_resume_on_another_number_of_processes_is_refused_with_epochs_left(run):
    """Each process normalises with its own rows' BatchNorm statistics (unless sync_bn)."""
    train_candidate(run, epochs=1, tag="t", progress=False)
    out = run / "train-t"
    state = torch.load(out / CHECKPOINT, weights_only=False)
    settings, config = state["settings"], {"epochs": 2, "sync_bn": False}
    torch.save({**state, "world_size": 2}, out / CHECKPOINT)
    with pytest.raises(RunError, match=r"was trained by 2 process\(es\), this resume runs 1: resume with as many"):
        standalone._resumed_state(out, settings, 1, config)
    assert standalone._resumed_state(out, settings, 1, {**config, "sync_bn": True})[0]["epoch"] == 1
    assert standalone._resumed_state(out, settings, 1, {**config, "epochs": 1})[0]["epoch"] == 1  # none left


@pytest.mark.parametrize("kwargs, message", [
    ({"weight_decay": -1.0}, r"--weight-decay must be a number >= 0, got -1\.0"),
    ({"weight_decay": float("nan")}, r"--weight-decay must be a number >= 0, got nan"),
    ({"lr": 0.0}, r"--lr must be a number > 0, got 0\.0"),
    ({"epochs": 0}, r"--epochs must be an int >= 1, got 0"),
    ({"epochs": True}, r"--epochs must be an int >= 1, got True"),
    ({"candidate": 1, "rank_tag": "x"}, "pass --candidate or --rank, not both"),
    ({"rank_tag": "nothing"}, r"--rank nothing names no finished ranking of this run"),
    ({"checkpoint": "best"}, r"the same id drawn from checkpoint-best\.pt is another network"),
])
def test_bad_input_is_refused_before_anything_is_written(run, kwargs, message):
    with pytest.raises(RunError, match=message):
        train_candidate(run, progress=False, **kwargs)
    assert not list(run.glob("train-*"))


def test_init_must_be_known(run):
    with pytest.raises(ValueError, match="init must be one of inherited, scratch, got 'warm'"):
        train_candidate(run, init="warm", progress=False)


def test_step_streams_drive_the_stochastic_modules_under_hard_gates():
    """A candidate trained alone draws shake-shake's weights from the step's streams, as the posterior does."""
    model = build_supernet(small_config(), 10)
    set_gates(model, "hard", masks=candidate_masks(model, 3, 0))
    set_step_streams(model, seed=9, step=5, row_offset=4)
    modules = list(_stochastic_modules(model))
    assert modules and all(m.rng_seed == 9 and m.rng_row_offset == 4 for m in modules)
    assert [m.rng_stream for m in modules] == [stream_id(m.rng_domain, 5, i) for i, m in enumerate(modules)]
    model.train()
    x = torch.randn(6, 1, 8, 8)
    first = model(x)
    set_step_streams(model, seed=9, step=6)
    assert not torch.equal(model(x), first)  # another step, other shake weights
    set_step_streams(model, seed=9, step=5, row_offset=4)
    assert torch.equal(model(x), first)
    with pytest.raises(ValueError, match="row_offset must be an int >= 0, got -1"):
        set_step_streams(model, seed=9, step=5, row_offset=-1)


# ---- the command ---------------------------------------------------------------------------------
def test_train_command_prints_both_accuracies_and_info_lists_it(run, capsys):
    assert main(["train", str(run), "--epochs", "1", "--candidate", "2", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    s = export_json(run / "train-inherited")
    assert out[0] == (f"candidate 2, trained alone from its inherited weights for 1 epoch (lr 0.05, weight decay "
                      f"0.0003, seed 3): held-out {100 * s['heldout_accuracy']:.2f}%, "
                      f"test {100 * s['test_accuracy']:.2f}%")
    assert out[1] == (f"  with its inherited weights, untrained: held-out "
                      f"{100 * s['inherited_heldout_accuracy']:.2f}%, test {100 * s['inherited_test_accuracy']:.2f}%")
    assert out[-1] == f"results: {run / 'train-inherited'} (pgnas-fast evaluate scores it)"
    assert main(["info", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(line for line in lines if "train-inherited" in line)
    assert line == (f"  alone      train-inherited: finished, candidate 2 from its inherited weights, 1 epoch: held-out "
                    f"{100 * s['heldout_accuracy']:.2f}%, test {100 * s['test_accuracy']:.2f}% (inherited weights, "
                    f"untrained: held-out {100 * s['inherited_heldout_accuracy']:.2f}%, test "
                    f"{100 * s['inherited_test_accuracy']:.2f}%)")
    assert main(["evaluate", str(run / "train-inherited")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{s['test_accuracy']:.6f}"


@pytest.mark.parametrize("argv, message", [
    (["--tag", "a/b"], "--tag must be letters, digits, '_', '.' or '-', got 'a/b'"),
    (["--tag", ""], "--tag must be letters, digits, '_', '.' or '-', got ''"),
    (["--init", "warm"], "argument --init: invalid choice: 'warm'"),
    (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    (["--candidate", "1", "--rank", "x"], "argument --rank: not allowed with argument --candidate"),
    # a negative number in exponent form is a value, checked as one (not an unknown option)
    (["--weight-decay", "-1e-4"], "--weight-decay must be a number >= 0, got -0.0001"),
    (["--lr", "-2E+1"], "--lr must be a number > 0, got -20.0"),
])
def test_train_command_refuses_bad_arguments(run, capsys, argv, message):
    assert main(["train", str(run), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not list(run.glob("train-*"))


def test_a_fresh_search_removes_the_old_run_s_trainings(run):
    """They are of the old weights."""
    from pgnas_fast.search import run_search

    train_candidate(run, epochs=1, progress=False)
    run_search(small_config(), seed=5, out_dir=run, overwrite=True, progress=False)
    assert not (run / "train-inherited").exists()


# ---- correlate: the search's ranking against training alone ----------------------------------------
def test_picks_from_the_ranking_take_the_choice_first_and_then_the_spread_or_the_top():
    from pgnas_fast.search.correlate import pick_from_ranking

    scores = [0.5, 0.9, 0.7, 0.9, 0.1, 0.3, 0.6]
    kept = [0.8, 0.8, 0.8, 0.7, 0.8, 0.8, 0.8]
    rows = [{"id": i, "first_round_score": s, "kept_fraction": k} for i, (s, k) in enumerate(zip(scores, kept))]
    # the search's order: 3 (0.9, the smaller network of the tie), 1 (0.9), 2, 6, 0, 5, 4
    assert [r["id"] for r in pick_from_ranking(rows, 3, first=3)] == [3, 6, 4]
    assert [r["id"] for r in pick_from_ranking(rows, 7, first=3)] == [3, 1, 2, 6, 0, 5, 4]
    assert [r["id"] for r in pick_from_ranking(rows, 4, first=3)] == [3, 2, 0, 4]
    assert [r["id"] for r in pick_from_ranking(rows, 5, first=3)] == [3, 2, 6, 0, 4]  # places 0, 1.5, 3, 4.5, 6 rounded
    # racing's choice need not lead on the first round's score: it leads the spread all the same
    assert [r["id"] for r in pick_from_ranking(rows, 3, first=6)] == [6, 2, 4]
    # the top: the search's order's first
    assert [r["id"] for r in pick_from_ranking(rows, 3, first=3, pick="top")] == [3, 1, 2]
    assert [r["id"] for r in pick_from_ranking(rows, 3, first=6, pick="top")] == [6, 3, 1]
    assert [r["id"] for r in pick_from_ranking(rows, 7, first=3, pick="top")] == [3, 1, 2, 6, 0, 5, 4]
    with pytest.raises(ValueError, match="pick must be one of spread, top, got 'best'"):
        pick_from_ranking(rows, 3, first=3, pick="best")


@pytest.mark.parametrize("n", [2, 5, 40])
def test_spearman_rho_is_scipy_s_with_ties(n):
    from scipy.stats import spearmanr

    from pgnas_fast.search.correlate import spearman_rho

    generator = torch.Generator().manual_seed(n)
    xs = torch.randint(0, 6, (n,), generator=generator).tolist()  # coarse: many ties, as accuracies are
    ys = (torch.tensor(xs) + torch.randint(0, 4, (n,), generator=generator)).tolist()
    rho, expected = spearman_rho(xs, ys), spearmanr(xs, ys).statistic
    assert math.isnan(rho) if math.isnan(expected) else rho == pytest.approx(expected)
    assert math.isnan(spearman_rho([1.0], [2.0])) and math.isnan(spearman_rho([1.0, 1.0], [2.0, 3.0]))


def test_correlate_trains_the_spread_and_correlates_their_scores(run, capsys):
    from pgnas_fast.search.correlate import pick_from_ranking, spearman_rho
    from pgnas_fast.search.study import kendall_tau, none_if_nan

    assert main(["correlate", str(run), "--candidates", "3", "--epochs", "1", "--quiet"]) == 0
    out = run / "correlate-default"
    result = json.loads((out / "correlation.json").read_text())
    ranked = read_jsonl(run / "candidates.jsonl")
    arch = json.loads((run / "architecture.json").read_text())
    picked = pick_from_ranking(ranked, 3, arch["candidate"])
    assert [c["id"] for c in result["candidates"]] == [r["id"] for r in picked]
    for c, row in zip(result["candidates"], picked):
        trained = export_json(out / f"c{c['id']}")
        assert (c["heldout_accuracy"], c["test_accuracy"]) == (trained["heldout_accuracy"], trained["test_accuracy"])
        assert (c["params"], c["macs"]) == (trained["params_subnet"], trained["macs_subnet"])
        assert c["inherited_score"] == trained["inherited_heldout_accuracy"] and trained["init"] == "scratch"
        # (the search ranked exhaustively: every candidate's first round is the whole held-out split)
        assert c["ranking_score"] == row["first_round_score"] == c["inherited_score"]
        assert c["inherited_rank"] == 1 + sum(r["first_round_score"] > row["first_round_score"] for r in ranked)
    scores = [c["inherited_score"] for c in result["candidates"]]
    after = [c["heldout_accuracy"] for c in result["candidates"]]
    tau = kendall_tau(scores, after)
    assert result["kendall_tau"] == (None if tau != tau else pytest.approx(tau))
    assert result["search_choice"] == arch["candidate"]
    choice = next(c for c in result["candidates"] if c["id"] == arch["candidate"])  # (the best is always picked)
    assert result["search_choice_trained_rank"] == 1 + sum(a > choice["heldout_accuracy"] for a in after)
    assert result["spearman_rho"] == none_if_nan(spearman_rho(scores, after))
    best = max(result["candidates"], key=lambda c: (c["heldout_accuracy"], -c["id"]))  # (ties: the lower id)
    assert (result["best_trained"], result["best_trained_inherited_rank"]) == (best["id"], best["inherited_rank"])
    report = (out / "correlation.md").read_text()
    assert (out / "correlation.png").is_file() and "| candidate | inherited score (search's rank) |" in report
    assert "3 candidates spread over the search's ranking of 6, each trained alone from scratch for 1 epoch " in report
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("3 candidates spread over the search's ranking of 6, trained alone from scratch "
                                 "for 1 epoch: Kendall's tau ")
    assert printed[-1] == f"report: {out / 'correlation.md'}"
    assert main(["info", str(run)]) == 0
    assert any(line.startswith("  correlate  correlate-default: finished, 3 candidates: Kendall's tau ")
               for line in capsys.readouterr().out.splitlines())


def test_correlate_top_trains_the_ranking_s_first_and_a_resume_keeps_the_pick(run, capsys):
    from pgnas_fast.search.correlate import correlate_run, pick_from_ranking

    ranked = read_jsonl(run / "candidates.jsonl")
    arch = json.loads((run / "architecture.json").read_text())
    assert main(["correlate", str(run), "--candidates", "2", "--pick", "top", "--epochs", "1", "--quiet"]) == 0
    out = run / "correlate-default"
    result = json.loads((out / "correlation.json").read_text())
    top = [r["id"] for r in pick_from_ranking(ranked, 2, arch["candidate"], "top")]
    assert [c["id"] for c in result["candidates"]] == top and result["pick"] == "top"
    assert [c["inherited_rank"] for c in result["candidates"]] == [1, 2]  # (no ties in this run's first two)
    assert pick_from_ranking(ranked, 2, arch["candidate"]) != pick_from_ranking(ranked, 2, arch["candidate"], "top")
    assert capsys.readouterr().out.startswith("the top 2 candidates of the search's ranking of 6, trained alone from "
                                              "scratch for 1 epoch: Kendall's tau ")
    assert "The top 2 candidates of the search's ranking of 6, each trained alone" in (
        out / "correlation.md").read_text()
    with pytest.raises(RunError, match=r"with other settings: candidates .*; pick 'top' \(now 'spread'\)"):
        correlate_run(run, candidates=2, epochs=1, resume=True, progress=False)
    # a correlation written before --pick existed spread its candidates: it resumes as one
    spread = correlate_run(run, candidates=2, epochs=1, tag="old", progress=False)
    settings = json.loads((run / "correlate-old" / "settings.json").read_text())
    del settings["pick"]
    (run / "correlate-old" / "settings.json").write_text(json.dumps(settings))
    assert correlate_run(run, candidates=2, epochs=1, tag="old", resume=True, progress=False) == spread


def test_correlate_trains_with_its_settings_and_overwrite_trains_again(run):
    """--lr, --seed and --epochs reach every training; --overwrite trains every candidate again (none of the
    old trainings is read back); the inherited score is the training's own evaluation on the whole held-out
    split, not the ranking's score (racing scored most candidates on a share of it)."""
    from pgnas_fast.search.correlate import correlate_run

    ranked = read_jsonl(run / "candidates.jsonl")
    for row in ranked:  # as racing's first round would: another score, the same order
        row["first_round_score"] /= 2
    (run / "candidates.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ranked))
    correlate_run(run, candidates=2, epochs=1, progress=False)
    result = correlate_run(run, candidates=2, epochs=2, lr=0.01, seed=4, overwrite=True, progress=False)
    assert result["training"] == {"init": "scratch", "epochs": 2, "lr": 0.01, "weight_decay": 3e-4, "training_seed": 4}
    for c in result["candidates"]:
        trained = export_json(run / "correlate-default" / f"c{c['id']}")
        assert (trained["epochs"], trained["lr"], trained["training_seed"], trained["resumed_from_epoch"]) == (
            2, 0.01, 4, 0)
        assert c["inherited_score"] == trained["inherited_heldout_accuracy"] == 2 * c["ranking_score"]


def test_correlate_can_take_every_ranked_candidate(run, monkeypatch):
    from pgnas_fast.search import correlate

    def untrained(run_dir, *, candidate, **kwargs):  # (what is picked is the question here, not the training)
        return {"inherited_heldout_accuracy": candidate / 10, "heldout_accuracy": candidate / 10,
                "test_accuracy": 0.5, "params_subnet": 1, "macs_subnet": 1}

    monkeypatch.setattr(correlate, "train_candidate", untrained)
    result = correlate.correlate_run(run, candidates=6, epochs=1, progress=False)
    assert sorted(c["id"] for c in result["candidates"]) == list(range(6))


def test_correlate_resumes_without_training_a_finished_candidate_again(run, monkeypatch):
    from pgnas_fast.search import correlate

    whole = correlate.correlate_run(run, candidates=3, epochs=1, tag="whole", progress=False)
    real_train, calls = correlate.train_candidate, []

    def train_then_die_at_the_second(*args, **kwargs):
        calls.append(kwargs["candidate"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(correlate, "train_candidate", train_then_die_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        correlate.correlate_run(run, candidates=3, epochs=1, tag="cut", progress=False)
    with pytest.raises(RunError, match="holds a correlation: --resume continues it, --overwrite replaces it"):
        correlate.correlate_run(run, candidates=3, epochs=1, tag="cut", progress=False)
    with pytest.raises(RunError, match=r"was started with other settings: epochs 1 \(now 2\)"):
        correlate.correlate_run(run, candidates=3, epochs=2, tag="cut", resume=True, progress=False)
    calls.clear()
    monkeypatch.setattr(correlate, "train_candidate",
                        lambda *a, **k: calls.append(k["candidate"]) or real_train(*a, **k))
    resumed = correlate.correlate_run(run, candidates=3, epochs=1, tag="cut", resume=True, progress=False)
    assert calls == [c["id"] for c in whole["candidates"]][1:]  # the first finished before the kill
    assert resumed == whole


def test_a_correlation_stopped_before_its_first_training_is_started_afresh(run, monkeypatch):
    """Its settings alone are no work to keep: the same command again starts it, without --resume."""
    from pgnas_fast.search import correlate

    real_train = correlate.train_candidate

    def refuse(*args, **kwargs):  # (as a data error in the first training's load would)
        raise RunError("the data went away")

    monkeypatch.setattr(correlate, "train_candidate", refuse)
    with pytest.raises(RunError, match="the data went away"):
        correlate.correlate_run(run, candidates=2, epochs=1, tag="again", progress=False)
    assert (run / "correlate-again" / "settings.json").exists()
    monkeypatch.setattr(correlate, "train_candidate", real_train)
    result = correlate.correlate_run(run, candidates=2, epochs=1, tag="again", progress=False)
    assert len(result["candidates"]) == 2
    # once a training has begun (or the correlation finished) the same command is refused
    with pytest.raises(RunError, match="holds a correlation: --resume continues it"):
        correlate.correlate_run(run, candidates=2, epochs=1, tag="again", progress=False)
    (run / "correlate-again" / "correlation.json").unlink()
    with pytest.raises(RunError, match="holds a correlation: --resume continues it"):
        correlate.correlate_run(run, candidates=2, epochs=1, tag="again", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"candidates": 1}, r"--candidates must be an int >= 2 \(a correlation needs two\), got 1"),
    ({"candidates": 7}, "--candidates 7 is more than the 6 the search ranked"),
    ({"weight_decay": -0.5}, r"--weight-decay must be a number >= 0, got -0\.5"),
    ({"pick": "best"}, "--pick must be one of spread, top, got 'best'"),
])
def test_correlate_refuses_bad_input_before_writing(run, kwargs, message):
    from pgnas_fast.search.correlate import correlate_run

    with pytest.raises(RunError, match=message):
        correlate_run(run, progress=False, **{"candidates": 3, **kwargs})
    assert not list(run.glob("correlate-*"))


def test_correlate_needs_a_finished_search(run):
    from pgnas_fast.search.correlate import correlate_run

    (run / "candidates.jsonl").unlink()
    with pytest.raises(RunError, match="holds no finished search to correlate"):
        correlate_run(run, candidates=2, progress=False)


def test_correlate_checks_the_run_before_it_touches_a_held_correlation(run):
    """A bad --data-dir (the digits read none) is refused before --overwrite empties anything, and a new
    tag is not created."""
    from pgnas_fast.data import DataError
    from pgnas_fast.search.correlate import correlate_run

    correlate_run(run, candidates=2, epochs=1, tag="kept", progress=False)
    before = sorted(p.relative_to(run) for p in (run / "correlate-kept").rglob("*"))
    for tag, flags in (("kept", {"overwrite": True}), ("new", {})):
        with pytest.raises(DataError, match="leave --data-dir out"):
            correlate_run(run, candidates=2, epochs=1, tag=tag, data_dir=run, progress=False, **flags)
    assert sorted(p.relative_to(run) for p in (run / "correlate-kept").rglob("*")) == before
    assert not (run / "correlate-new").exists()


def test_correlate_resume_takes_the_run_s_values_for_its_defaults_and_mends_damaged_files(run):
    from pgnas_fast.search.correlate import correlate_run

    first = correlate_run(run, candidates=2, tag="d", progress=False, epochs=1)
    # the same values spelt out (the run's lr and seed) are the same settings
    again = correlate_run(run, candidates=2, tag="d", resume=True, progress=False, epochs=1, lr=0.05, seed=3)
    assert again == first
    damaged = run / "correlate-d" / f"c{first['candidates'][1]['id']}" / "export.json"
    for text in ("{bad", '{"heldout_accuracy": 0.5}'):
        damaged.write_text(text)  # written again from the finished checkpoint, not trained again
        assert correlate_run(run, candidates=2, tag="d", resume=True, epochs=1, progress=False) == first
        assert json.loads(damaged.read_text())["resumed_from_epoch"] == 1
    (run / "correlate-d" / "settings.json").write_text("[1, 2]")
    with pytest.raises(RunError, match=r"settings\.json' is unreadable: the settings of the trainings in .* are "
                                       r"unknown; correlate afresh \(--overwrite\)"):
        correlate_run(run, candidates=2, tag="d", resume=True, epochs=1, progress=False)


def test_a_training_directory_is_not_taken_for_a_run(run, capsys):
    """Its config.json, architecture.json and train_log.jsonl look like a run's: search and info refuse it."""
    from pgnas_fast.search import run_search
    from pgnas_fast.search.run_info import run_info

    train_candidate(run, epochs=1, progress=False)
    out = run / "train-inherited"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for flags in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(RunError, match=r"is an export directory \(export\.json: pgnas-fast export or train wrote "
                                           r"it\), not a run: search into another --out"):
            run_search(small_config(), seed=3, out_dir=out, progress=False, **flags)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(RunError, match=r"is an export directory .* not a run: `pgnas-fast evaluate` scores"):
        run_info(out)


def test_a_damaged_training_checkpoint_is_a_clear_error(run):
    train_candidate(run, epochs=2, tag="t", progress=False)
    (run / "train-t" / "export.json").unlink()  # cut before its export (a finished one is not read again)
    path = run / "train-t" / CHECKPOINT
    state = torch.load(path, weights_only=False)
    for damaged, message in (({**state, "epoch": "1"}, "is not a candidate training's checkpoint"),
                             ({**state, "epoch": 9}, "is not a candidate training's checkpoint"),
                             ({**state, "model": {}}, "does not fit candidate .*'s training .* train afresh"),
                             ({k: v for k, v in state.items() if k != "settings"},
                              "is not a candidate training's checkpoint"),
                             ([1, 2], r"is not a pgnas-fast checkpoint \(no model state in it\)")):
        torch.save(damaged, path)
        with pytest.raises(RunError, match=message):
            train_candidate(run, epochs=2, tag="t", resume=True, progress=False)
    # the log beside it, damaged (not text): its epochs are missing
    torch.save(state, path)
    (run / "train-t" / "train_log.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(RunError, match=r"train_log.jsonl' holds 0 epoch\(s\), but candidate-checkpoint.pt is of "
                                       r"epoch 2: restore it, or train afresh \(--overwrite\)"):
        train_candidate(run, epochs=2, tag="t", resume=True, progress=False)


def test_a_diverged_training_says_so(run, capsys, monkeypatch):
    train_candidate(run, epochs=1, lr=1e6, tag="big", progress=False)
    assert ("note: the training diverged (its loss is nan from epoch 1 on): its accuracies are of a broken network; "
            "train again with a lower --lr") in capsys.readouterr().err

    def finite_then_nan(*args, on_epoch_end, **kwargs):  # (names the first epoch whose loss is not finite)
        for epoch, loss in ((1, 0.5), (2, float("nan")), (3, float("inf"))):
            on_epoch_end(epoch, {"epoch": epoch, "loss": loss, "seconds": 0.1})

    monkeypatch.setattr(standalone, "train_posterior", finite_then_nan)
    train_candidate(run, epochs=3, tag="late", progress=False)
    assert "(its loss is inf from epoch 2 on)" in capsys.readouterr().err


def test_info_says_when_a_training_read_weights_the_run_has_trained_on_since(run, capsys):
    """As when a run still training was read at epoch 1, and `search --resume` trained it on."""
    train_candidate(run, epochs=1, progress=False)
    export = run / "train-inherited" / "export.json"
    export.write_text(json.dumps({**json.loads(export.read_text()), "checkpoint_epoch": 1}))
    assert main(["info", str(run)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "train-inherited" in line)
    assert line.endswith("; from checkpoint.pt of epoch 1, which the run has trained on since")
    assert "(inherited weights, untrained: held-out " in line

"""What the search pipeline promises beyond its main path (each test pins a bug a mutation review found
the suite letting through): the summary's numbers, a resume after a kill between the log and the
checkpoint, export's record of the search's choice, the study's statistics, the config checks that
--set and --config share with the flags, and the feeds' batch limits."""
from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import same_run_files, small_config

from pgnas_fast import configs
from pgnas_fast.nn import GatedConv2d, GatedLinear, candidate_masks, set_gates
from pgnas_fast.ops.streams import Domain
from pgnas_fast.search import accuracy, best_candidate, run_search
from pgnas_fast.search import run as run_module
from pgnas_fast.search.export import architecture_record, export_candidate
from pgnas_fast.search.io import read_jsonl
from pgnas_fast.search.rank import CandidateScorer, round_ends, uniform_drop_logits
from pgnas_fast.search.run import load_run, rank_search_candidates
from pgnas_fast.search.study import kendall_tau, run_study, score_rank


@pytest.fixture(scope="module")
def run(finished_run):
    out, result = finished_run
    return out, result.summary


def test_summary_numbers_are_what_they_name(run):
    out, summary = run
    loaded = load_run(out)
    assert summary["supernet_test_accuracy"] == accuracy(loaded.model, loaded.feed.eval_batches("test"))
    assert summary["supernet_heldout_accuracy"] == accuracy(loaded.model, loaded.feed.eval_batches("heldout"))
    rows, random_rows = read_jsonl(out / "candidates.jsonl"), read_jsonl(out / "random_candidates.jsonl")
    assert summary["random_kept_fraction"] == pytest.approx(statistics.fmean(r["kept_fraction"] for r in random_rows))
    assert summary["random_mean_heldout_accuracy"] == pytest.approx(statistics.fmean(r["score"] for r in random_rows))
    assert summary["guided_mean_kept_fraction"] == pytest.approx(statistics.fmean(r["kept_fraction"] for r in rows))
    # throughput counts both kinds of candidate
    assert summary["candidates_per_second"] * summary["rank_seconds"] == pytest.approx(len(rows) + len(random_rows))
    assert summary["resumed_evaluations"] == 0


def test_table_3_means_under_racing_are_over_the_images_every_candidate_saw(tmp_path):
    """Racing scores most candidates on its first share alone and the finalists on all: the guided and
    random means are both over the first share (the random baseline races too)."""
    summary = run_search(small_config(ranking="racing", candidates=12, random_baseline=12), seed=3, out_dir=tmp_path,
                         progress=False).summary
    rows, random_rows = read_jsonl(tmp_path / "candidates.jsonl"), read_jsonl(tmp_path / "random_candidates.jsonl")
    assert summary["mean_heldout_images"] == 19 == min(r["images"] for r in random_rows)  # ceil(300 / 16)
    assert summary["finalist_heldout_images"] == 300
    assert "over the first 19 held-out images (racing's first share)" in (tmp_path / "report.md").read_text()
    assert max(r["images"] for r in rows) == max(r["images"] for r in random_rows) == 300
    loaded = load_run(tmp_path)
    scorer = CandidateScorer(loaded.model, *loaded.feed.split("heldout"), seed=3, prepare=loaded.feed.prepare_eval)
    assert [r["first_round_score"] for r in rows] == [n / 19 for n in scorer.correct(range(12), 0, 19)]
    assert summary["guided_mean_heldout_accuracy"] == pytest.approx(
        statistics.fmean(r["first_round_score"] for r in rows))
    assert summary["random_mean_heldout_accuracy"] == pytest.approx(
        statistics.fmean(r["first_round_score"] for r in random_rows))


def test_a_lone_random_candidate_and_the_score_figure_compare_on_the_first_round(tmp_path, monkeypatch):
    """A random baseline of one candidate races through the same rounds (its first-round score was over all
    300 images, the guided mean over 19); the report's score histogram shows both families' first-round
    scores, every candidate's, not racing's final scores (a finalist's covers 300 images)."""
    import matplotlib.axes

    from pgnas_fast.search.report import write_report

    run_search(small_config(ranking="racing", candidates=12, random_baseline=1), seed=3, out_dir=tmp_path,
               progress=False)
    rows, [lone] = read_jsonl(tmp_path / "candidates.jsonl"), read_jsonl(tmp_path / "random_candidates.jsonl")
    loaded = load_run(tmp_path)
    scorer = CandidateScorer(loaded.model, *loaded.feed.split("heldout"), seed=3, prepare=loaded.feed.prepare_eval,
                             domain=Domain.RANDOM_CANDIDATE, p_logits=uniform_drop_logits(loaded.model))
    assert lone["images"] == 300 and lone["first_round_score"] == scorer.correct([0], 0, 19)[0] / 19
    assert json.loads((tmp_path / "summary.json").read_text())["mean_heldout_images"] == 19
    drawn, labels = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "hist", lambda ax, values, **kw: drawn.append(list(values)))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda ax, text, **kw: labels.append(text))
    write_report(tmp_path)
    assert drawn == [[100 * lone["first_round_score"]], [100 * r["first_round_score"] for r in rows]]
    assert "accuracy on the first round's 19 held-out images (%)" in labels


def test_the_best_checkpoint_is_written_before_the_epoch_s(tmp_path, monkeypatch):
    """checkpoint.pt marks an epoch done: written after checkpoint-best.pt, a kill between the two
    cannot leave the best checkpoint an epoch behind for good."""
    real_save, saved = run_module.save_checkpoint, []
    monkeypatch.setattr(run_module, "save_checkpoint", lambda path, state: (saved.append(path.name),
                                                                           real_save(path, state)))
    run_search(small_config(epochs=1), seed=3, out_dir=tmp_path, progress=False)
    assert saved == ["checkpoint-best.pt", "checkpoint.pt"]


def test_resume_before_the_first_checkpoint_keeps_the_data_directory(tmp_path):
    """A run killed in its first epoch has data.json and no checkpoint: the resumed run reads the data
    directory from it and keeps it for the run's readers (rank, study, export)."""
    from data_fixtures import write_cifar10

    data, out = tmp_path / "data", tmp_path / "run"
    write_cifar10(data)
    config = configs.resolve("cifar10-supnet-m", {"batch_size": 4, "eval_batch_size": 4, "workers": 0,
                                                  "threads": 1, "heldout_size": 20, "candidates": 2,
                                                  "random_baseline": 0})
    run_search(config, seed=3, out_dir=out, progress=False, data_dir=data, smoke=True)
    written = json.loads((out / "data.json").read_text())
    assert written["data_dir"] == str(data.resolve()) and set(written) == {"data_dir", "fingerprint"}
    (out / "checkpoint.pt").unlink()
    run_search(config, seed=3, out_dir=out, progress=False, resume=True, smoke=True)
    assert json.loads((out / "data.json").read_text()) == written


def test_resume_after_a_kill_between_the_log_and_the_checkpoint(run, tmp_path, monkeypatch):
    """train_log.jsonl is written before checkpoint.pt: a kill in between leaves a row the checkpoint
    does not hold, and the resumed run drops it."""
    out, _ = run
    real_save = run_module.save_checkpoint
    saves = []

    def die_before_the_second_checkpoint(path, state):
        if path.name == "checkpoint.pt":
            saves.append(state["epoch"])
            if len(saves) == 2:
                raise KeyboardInterrupt
        real_save(path, state)

    monkeypatch.setattr(run_module, "save_checkpoint", die_before_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_search(small_config(), seed=3, out_dir=tmp_path, progress=False)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "train_log.jsonl")] == [1, 2]  # one row ahead
    monkeypatch.setattr(run_module, "save_checkpoint", real_save)
    run_search(small_config(), seed=3, out_dir=tmp_path, resume=True, progress=False)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "train_log.jsonl")] == [1, 2]
    same_run_files(tmp_path, out)


def test_export_records_the_search_s_choice_and_takes_candidate_0(run, tmp_path):
    out, _ = run
    summary = export_candidate(out, tmp_path / "best")
    arch = json.loads((out / "architecture.json").read_text())
    assert json.loads((tmp_path / "best" / "architecture.json").read_text()) == arch
    assert summary["heldout_accuracy"] == arch["score"] and summary["test_accuracy"] == arch["test_accuracy"]
    row0 = read_jsonl(out / "candidates.jsonl")[0]
    assert export_candidate(out, tmp_path / "zero", candidate=0)["candidate"] == 0
    record = json.loads((tmp_path / "zero" / "architecture.json").read_text())
    assert (record["candidate"], record["score"]) == (0, row0["score"])
    assert record["kept_fraction"] == pytest.approx(row0["kept_fraction"])


def test_architecture_in_channels_of_a_grouped_conv_are_its_gated_channels():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = GatedConv2d(4, 6, 3, padding=1, groups=2)
            self.head = GatedLinear(6, 3)

    net = Net()
    masks = {"grouped": torch.tensor([1.0, 0.0, 1.0, 1.0]), "head": torch.ones(6)}
    record = architecture_record(net, masks, config={"preset": "p", "posterior": "concrete"}, seed=0,
                                 candidate={"id": 0, "score": 0.5, "kept_fraction": 0.9}, test_accuracy=None,
                                 size={"params": 1, "macs": 1})
    assert [layer["in_channels"] for layer in record["layers"]] == [4, 6]
    assert record["layers"][0]["groups"] == 2 and record["layers"][0]["kept_channels"] == [0, 2, 3]


def test_racing_s_first_cut_and_the_tie_for_best_are_counted_from_the_rows():
    from pgnas_fast.search.rank import cut_note, first_round_cut, tied_for_best

    def row(i, first, images, score, kept=0.5):
        return {"id": i, "first_round_score": first, "images": images, "score": score, "kept_fraction": kept}

    # 8 candidates, 2 places after 4 images: ids 1 and 2 at 0.75 kept; 3 and 5 tied with them, dropped by the draw
    rows = [row(0, 0.5, 4, 0.5), row(1, 0.75, 16, 0.9, 0.4), row(2, 0.75, 16, 0.9), row(3, 0.75, 4, 0.75),
            row(4, 0.25, 4, 0.25), row(5, 0.75, 4, 0.75), row(6, 0.5, 4, 0.5), row(7, 0.0, 4, 0.0)]
    assert first_round_cut(rows) == {"images": 4, "places": 2, "score": 0.75, "tied": 4, "dropped_by_draw": 2}
    assert cut_note(first_round_cut(rows)).startswith("racing's first round (4 images) kept 2 places: 4 candidates "
                                                      "tied at its cut score 75.00%, 2 of them dropped by a seeded "
                                                      "draw alone")
    assert tied_for_best(rows) == 2 and best_candidate(rows)["id"] == 1  # the smaller network
    rows[5]["first_round_score"] = 0.5  # one tie fewer
    assert first_round_cut(rows)["dropped_by_draw"] == 1
    exhaustive = [row(i, s, 16, s) for i, s in enumerate((0.5, 0.75, 0.25))]
    assert first_round_cut(exhaustive) is None and cut_note(None) is None and tied_for_best(exhaustive) == 1
    assert cut_note({"images": 4, "places": 2, "score": 0.75, "tied": 2, "dropped_by_draw": 0}) is None
    assert cut_note({"images": 1, "places": 1, "score": 1.0, "tied": 3, "dropped_by_draw": 2}).startswith(
        "racing's first round (1 image) kept 1 place: 3 candidates")


def test_score_rank_ties_share_a_rank_and_kendall_tau_with_joint_ties():
    rows = [{"id": 0, "score": 0.5}, {"id": 1, "score": 0.9}, {"id": 2, "score": 0.5}, {"id": 3, "score": 0.1}]
    assert [score_rank(rows, c) for c in range(4)] == [2, 1, 2, 4]
    from scipy.stats import kendalltau

    xs, ys = [1, 1, 2, 3, 3, 4], [2, 2, 1, 3, 4, 4]  # pairs tied in both lists
    assert kendall_tau(xs, ys) == pytest.approx(kendalltau(xs, ys).statistic, abs=1e-12)


def test_study_statistics_match_an_exhaustive_ranking(run):
    out, _ = run
    n = 40
    result = run_study(out, candidates=n, tag="round2", progress=False)
    loaded = load_run(out)
    config = {**loaded.config, "candidates": n, "random_baseline": n, "ranking": "exhaustive"}
    guided = rank_search_candidates(loaded.model, loaded.feed, config, seed=loaded.seed, progress=False)
    random = rank_search_candidates(loaded.model, loaded.feed, config, seed=loaded.seed, progress=False, random=True)
    for name, rows in (("guided", guided), ("random", random)):
        scores = [r["score"] for r in rows]
        assert result[name] == pytest.approx({"mean": statistics.fmean(scores), "std": statistics.pstdev(scores),
                                              "best": max(scores),
                                              "kept_fraction": statistics.fmean(r["kept_fraction"] for r in rows)})
    for point in result["best_vs_candidates"]:
        best = best_candidate(guided[:point["candidates"]])
        assert (point["best_id"], point["best_heldout"]) == (best["id"], best["score"]), point
    racing = result["racing"]
    heldout = len(loaded.feed.split("heldout")[1])
    assert racing["exhaustive_images"] == n * heldout and racing["images"] < racing["exhaustive_images"]
    assert 0 < racing["survivors"] < n  # only those that went past the first round
    assert racing["winner_exhaustive_rank"] == score_rank(guided, racing["winner"])
    assert racing["exhaustive_winner"] == best_candidate(guided)["id"]
    # each point's test accuracy is its best candidate's, on the test split
    for point in result["best_vs_candidates"]:
        set_gates(loaded.model, "hard", masks=candidate_masks(loaded.model, loaded.seed, point["best_id"]))
        assert point["its_test"] == accuracy(loaded.model, loaded.feed.eval_batches("test")), point
    set_gates(loaded.model, "full")
    # tau pairs each survivor's racing score with its exhaustive one
    raced = rank_search_candidates(loaded.model, loaded.feed, {**config, "ranking": "racing"}, seed=loaded.seed,
                                   progress=False)
    exhaustive = {r["id"]: r["score"] for r in guided}
    survivors = [r for r in raced if r["images"] > min(r["images"] for r in raced)]
    assert (racing["winner"], racing["images"]) == (best_candidate(raced)["id"], sum(r["images"] for r in raced))
    assert racing["kendall_tau_survivors"] == pytest.approx(
        kendall_tau([r["score"] for r in survivors], [exhaustive[r["id"]] for r in survivors]), abs=1e-12)
    assert racing["kendall_tau_first_round"] == pytest.approx(
        kendall_tau([r["first_round_score"] for r in raced], [exhaustive[r["id"]] for r in raced]), abs=1e-12)


@pytest.mark.parametrize("key, value, expected", [
    ("epochs", 0, "an int > 0"), ("batch_size", 0, "an int > 0"), ("candidates", 0, "an int in \\[1, 2\\^40\\]"),
    ("candidates", 1 << 41, "an int in \\[1, 2\\^40\\]"), ("milestones", [True], "an ascending list of epochs > 0"),
    ("milestones", [150, 90], "an ascending list of epochs > 0"), ("momentum", 1, "a number in \\[0, 1\\)"),
    ("racing_eta", 1, "an int >= 2"), ("grad_clip", float("inf"), "a number >= 0"),
])
def test_config_file_values_out_of_range_are_refused(key, value, expected):
    """--set and --config bypass the CLI flags' own checks: the schema alone refuses these."""
    with pytest.raises(configs.ConfigError, match=f"config key '{key}' must be {expected}"):
        configs.resolve("digits-tiny", {key: value})


def test_resolve_copies_the_overrides_and_set_strips_the_key():
    overrides = {"supernet_args": {"width": 8, "gate_group_size": 4}, "milestones": [5]}
    config = configs.resolve("digits-tiny", overrides)
    config["supernet_args"]["width"] = 4
    config["milestones"].append(9)
    assert overrides == {"supernet_args": {"width": 8, "gate_group_size": 4}, "milestones": [5]}
    assert configs.parse_assignment("lr = 0.1") == ("lr", 0.1)


def test_racing_may_start_on_the_whole_held_out_set():
    assert configs.resolve("digits-tiny", {"racing_first_share": 1})["racing_first_share"] == 1


def test_a_last_batch_of_one_row_per_rank_is_shared():
    from pgnas_fast.search.feed import check_shards
    from pgnas_fast.search.parallel import Parallel

    check_shards([64, 64, 2], Parallel(1, 2), train_images=130, batch_size=64)
    check_shards([8, 4], Parallel(3, 4), train_images=12, batch_size=8)


def test_tensor_feed_limits_batches_and_sizes():
    from pgnas_fast.data import load_digits
    from pgnas_fast.search.feed import TensorFeed

    splits = load_digits(test=360, heldout=300, split_seed=0)
    smoke = TensorFeed(splits, batch_size=64, eval_batch_size=50, device="cpu", max_eval_batches=2)
    for split in ("heldout", "test"):
        assert [len(labels) for _, labels in smoke.eval_batches(split)] == [50, 50]
        assert len(smoke.split(split)[1]) == 100
    assert smoke.sizes() == {"train": 1137, "heldout": 300, "test": 360}
    full = TensorFeed(splits, batch_size=64, eval_batch_size=50, device="cpu")
    assert len(full.split("heldout")[1]) == 300 and len(list(full.eval_batches("test"))) == 8
    assert full.train_batch_sizes() == [64] * 17 + [1137 - 17 * 64]
    assert [len(labels) for _, labels in full.train_batches(0, 1)] == full.train_batch_sizes()
    assert torch.equal(full.recalibration_images(10), splits.train[0][:10])


def test_a_smoke_cifar_loader_feed_stops_at_max_steps(tmp_path):
    from data_fixtures import write_cifar10

    from pgnas_fast.search.feed import CifarLoaderFeed
    from pgnas_fast.search.run import build_feed, load_data

    write_cifar10(tmp_path)
    config = configs.resolve("cifar10-supnet-m", {"heldout_size": 50, "batch_size": 32, "workers": 0})
    feed = build_feed(config, load_data(config, tmp_path), torch.device("cpu"), seed=4, smoke=True)
    assert isinstance(feed, CifarLoaderFeed) and feed.steps_per_epoch() == run_module.SMOKE_STEPS
    assert len(list(feed.train_batches(0, 4))) == run_module.SMOKE_STEPS
    assert len(list(feed.train_shards(0, 4))) == run_module.SMOKE_STEPS


def test_best_vs_candidates_counts_end_at_a_round_count_once():
    from pgnas_fast.search.study import _counts_up_to

    assert _counts_up_to(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]  # the study's default
    assert _counts_up_to(500) == [1, 2, 5, 10, 20, 50, 100, 200, 500]  # --candidates 500: no duplicate row
    assert _counts_up_to(20) == [1, 2, 5, 10, 20] and _counts_up_to(1) == [1]


# ---- search/study.py --------------------------------------------------------------------------------
def test_study_report_prints_each_family_s_own_numbers():
    """Mutants: the random row printing the guided mean; the images ratio printed upside down."""
    from pgnas_fast.search.study import report_markdown

    study = {"preset": "p", "posterior": "gaussian", "seed": 1, "candidates": 3, "checkpoint_epoch": 2, "epochs": 5,
             "data": {"train": 10, "heldout": 6, "test": 4},
             "guided": {"mean": 0.8125, "std": 0.0625, "best": 0.875, "kept_fraction": 0.75},
             "random": {"mean": 0.4375, "std": 0.125, "best": 0.5, "kept_fraction": 0.6875},
             "best_vs_candidates": [{"candidates": 3, "best_id": 2, "best_heldout": 0.875, "its_test": 0.8}],
             "racing": {"winner": 2, "exhaustive_winner": 1, "winner_exhaustive_rank": 2, "images": 100,
                        "exhaustive_images": 900, "first_round_images": 25, "survivors": 2,
                        "kendall_tau_first_round": 0.25, "kendall_tau_survivors": -0.5}}
    text = report_markdown(study)
    assert text.startswith("# Sampling studies: p (gaussian posterior), seed 1, 3 candidates\n\nThe weights of "
                           "epoch 2 (of 5); every candidate scored on the 6 held-out images (racing: its share), "
                           "test accuracies on the 4 test images")
    assert "| guided (learned p) | 81.25% | 6.25% | 87.50% | 75.00% |" in text
    assert "| random (mean p everywhere) | 43.75% | 12.50% | 50.00% | 68.75% |" in text
    assert "| 3 | 2 | 87.50% | 80.00% |" in text
    assert "Racing's winner is candidate 2 (exhaustive winner 1); its exhaustive score ranks 2" in text
    assert "Racing read 100 candidate-images, exhaustive 900 (9.0x more)" in text
    assert ("Kendall's tau against the exhaustive scores: of every candidate's score on the first round's 25 "
            "images (the order racing's first cut acts on), 0.250; of the final racing scores of the 2 first-round "
            "survivors, -0.500 (a finalist's" in text)


def test_study_racing_section_compares_with_the_guided_ranking(finished_run, monkeypatch):
    """Mutants: the "exhaustive winner" taken from the racing rows; racing run with rank's default first
    share instead of the run's racing_first_share. Scores come from a stand-in ranking whose racing
    winner is not the exhaustive one."""
    from pgnas_fast.search import study

    out, _ = finished_run
    config = json.loads((out / "config.json").read_text())["config"]
    full = config["heldout_size"]
    first = round_ends("racing", full, config["racing_eta"], config["racing_first_share"])[0]
    rows = {
        "guided candidates": [(0.5, full), (0.9, full), (0.7, full), (0.6, full)],
        "random candidates": [(0.25, full), (0.5, full), (0.25, full), (0.75, full)],
        "racing": [(0.4, first), (0.6, full), (0.8, full), (0.3, first)],
    }
    calls = {}

    def ranking(scorer, candidates, **kwargs):
        calls[kwargs["desc"]] = kwargs
        assert list(candidates) == [0, 1, 2, 3]
        return [{"id": i, "score": score, "images": images, "first_round_score": score, "kept_fraction": 0.5}
                for i, (score, images) in enumerate(rows[kwargs["desc"]])]

    monkeypatch.setattr(study, "rank", ranking)
    result = study.run_study(out, candidates=4, tag="stand-in", progress=False)
    assert calls["racing"]["strategy"] == "racing"
    assert (calls["racing"]["eta"], calls["racing"]["first_share"]) == (config["racing_eta"],
                                                                        config["racing_first_share"])
    # tau of the first round (each candidate's first 25 images) over all four: 4 pairs concordant, 2 not
    assert result["racing"] == {"winner": 2, "exhaustive_winner": 1, "winner_exhaustive_rank": 2,
                                "images": 2 * first + 2 * full, "exhaustive_images": 4 * full,
                                "first_round_images": first, "survivors": 2,
                                "kendall_tau_first_round": pytest.approx(1 / 3), "kendall_tau_survivors": -1.0,
                                "first_round_cut": {"images": first, "places": 2, "score": 0.6, "tied": 1,
                                                    "dropped_by_draw": 0}}
    assert [c["best_id"] for c in result["best_vs_candidates"]] == [0, 1, 1]
    assert result["random"]["best"] == 0.75 and result["guided"]["best"] == 0.9


# ---- search/export.py -------------------------------------------------------------------------------
def test_architecture_record_names_each_layer_s_shape_and_probabilities():
    """Mutants: out_channels read from the weight's second dim; p written as logits; stride and
    dilation swapped."""
    from pgnas_fast.nn import GatedConv2d, GatedLinear
    from pgnas_fast.search.export import architecture_record

    net = torch.nn.Sequential(GatedConv2d(4, 6, 3, stride=2, dilation=3, gate_groups=2, p_init=0.3),
                              GatedLinear(6, 5, p_init=0.2))
    with torch.no_grad():
        net[0].p_logit.copy_(torch.tensor([-1.0, 2.0]))
    masks = {"0": torch.tensor([1.0, 1.0, 0.0, 0.0]), "1": torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0])}
    record = architecture_record(net, masks, config={"preset": "p", "posterior": "concrete"}, seed=2,
                                 candidate={"id": 7, "score": 0.5, "kept_fraction": 0.6}, test_accuracy=0.25,
                                 size={"params": 99, "macs": 1234})
    conv, linear = record["layers"]
    assert (conv["in_channels"], conv["out_channels"], linear["in_channels"], linear["out_channels"]) == (4, 6, 6, 5)
    assert (conv["stride"], conv["dilation"], conv["kernel_size"]) == ([2, 2], [3, 3], [3, 3])
    assert conv["p"] == pytest.approx(torch.sigmoid(torch.tensor([-1.0, 2.0])).tolist())
    assert linear["p"] == pytest.approx([0.2] * len(linear["gate_groups"]), abs=1e-6)
    assert conv["kept_channels"] == [0, 1] and linear["kept_channels"] == [1, 2, 3, 4]
    assert (record["candidate"], record["score"], record["test_accuracy"], record["seed"]) == (7, 0.5, 0.25, 2)
    assert (record["params"], record["macs"]) == (99, 1234)


@pytest.mark.parametrize("candidate", [-1, 1 << 40])
def test_export_refuses_a_candidate_outside_the_id_range(finished_run, tmp_path, candidate):
    """Mutant: the range check dropped (the Python API has no argparse in front of it)."""
    from pgnas_fast.search.export import export_candidate
    from pgnas_fast.search.run import RunError

    out, _ = finished_run
    with pytest.raises(RunError, match=rf"--candidate must be an id in \[0, 2\^40\), got {candidate}"):
        export_candidate(out, tmp_path / "export", candidate=candidate)
    assert not (tmp_path / "export").exists()


def test_export_refuses_an_architecture_naming_a_bool_candidate(finished_run, tmp_path):
    """Mutant: `true` (an int to Python) taken as candidate 1."""
    import shutil

    from pgnas_fast.search.export import export_candidate
    from pgnas_fast.search.run import RunError

    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    (run / "architecture.json").write_text('{"candidate": true}')
    with pytest.raises(RunError, match="names candidate True, not an id in \\[0, 2\\^40\\): pass --candidate"):
        export_candidate(run, tmp_path / "export")


def test_export_of_a_ranking_from_before_checkpoint_epoch_was_recorded(finished_run, tmp_path):
    """A rank summary without `checkpoint_epoch` (an older ranking) is exported, not refused. Mutant: the
    `ranked_epoch is not None` guard dropped."""
    import shutil

    from pgnas_fast.search.export import export_candidate

    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    (run / "rank-old").mkdir()
    (run / "rank-old" / "summary.json").write_text(json.dumps({"best": {"id": 3}, "bn_recalibrate": 0}))
    summary = export_candidate(run, tmp_path / "export", rank_tag="old")
    assert (summary["candidate"], summary["rank_tag"], summary["bn_recalibrate"]) == (3, "old", 0)


def test_evaluate_export_counts_every_batch_of_the_split(finished_run, tmp_path):
    """Mutant: correct / len(last batch) (the same as correct / seen while a split fits one batch)."""
    from pgnas_fast.search.export import evaluate_export, export_candidate

    out = tmp_path / "export"
    summary = export_candidate(finished_run[0], out, candidate=1)
    assert evaluate_export(out) == pytest.approx(summary["test_accuracy"], abs=1e-9)
    run_config = json.loads((out / "config.json").read_text())
    run_config["config"]["eval_batch_size"] = 100  # 360 test images: 100, 100, 100, 60
    (out / "config.json").write_text(json.dumps(run_config))
    assert evaluate_export(out) == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert evaluate_export(out, split="heldout", standalone=False) == pytest.approx(summary["heldout_accuracy"],
                                                                                      abs=1e-9)


# ---- configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, accepted, refused", [
    ("candidates", 1 << 40, (1 << 40) + 1),  # ids 0 .. 2^40 - 1: every stream major
    ("random_baseline", 1 << 40, (1 << 40) + 1),
    ("random_baseline", 0, -1),  # 0: no random baseline
    ("split_seed", (1 << 32) - 1, 1 << 32),  # numpy's RandomState takes 32 bits
    ("p_init", 0.999, 1.0),
    ("p_init", 1e-6, 0.0),  # p = 0 would be an infinite logit
    ("milestones", [1, 1], [0, 5]),  # epochs count from 1
    ("racing_first_share", 1e-6, 0.0),
])
def test_schema_boundaries(key, accepted, refused):
    """Mutants: each bound moved by one (< for <=, >= for >)."""
    assert configs.resolve("digits-tiny", {key: accepted})[key] == accepted
    with pytest.raises(configs.ConfigError, match=f"config key '{key}' must be"):
        configs.resolve("digits-tiny", {key: refused})


def test_the_commands_keep_freed_host_memory_on_glibc_only(monkeypatch):
    """search/host.py: glibc's thresholds are set where glibc runs (this Linux CI), nowhere else."""
    import platform

    from pgnas_fast.search import host

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert host.keep_freed_host_memory() is expected
    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert host.keep_freed_host_memory() is False
    # every command sets them first
    from pgnas_fast.cli import main

    calls = []
    monkeypatch.setattr(host, "keep_freed_host_memory", lambda: calls.append(1))
    assert main(["info", "--preset", "digits-tiny"]) == 0 and calls == [1]

"""Candidate masks for K candidates at once, and ranking: batched == sequential == reload exactly,
racing, resume after a kill."""
from __future__ import annotations

import json
import math

import pytest
import torch

import pgnas_fast as pf
from pgnas_fast import configs, supernets
from pgnas_fast.nn import candidate_masks, gated_layers, set_gates, stacked_candidate_masks
from pgnas_fast.ops import Domain, stream_id
from pgnas_fast.search import run_search
from pgnas_fast.search.rank import CandidateScorer, ProgressLog, best_candidate, rank, round_ends, uniform_drop_logits
from pgnas_fast.search.run import load_data, rebuild_for_evaluation
from pgnas_fast.search.study import score_rank
from pgnas_fast.search.train import mean_drop_probability


@pytest.mark.parametrize("domain", [Domain.CANDIDATE, Domain.RANDOM_CANDIDATE])
def test_candidate_keep_rows_are_the_hard_gates_of_each_candidate(backend, domain):
    p_logit = torch.randn(37, generator=torch.Generator().manual_seed(0)) * 2
    ids = [0, 5, 2, 1 << 33, (1 << 40) - 1]
    masks = pf.ops.candidate_keep(p_logit, torch.tensor(ids), seed=(1 << 40) + 9, layer=3, domain=domain,
                                  backend=backend)
    assert masks.shape == (5, 37) and masks.dtype == torch.float32
    for k, c in enumerate(ids):
        expected = pf.ops.gate_keep(p_logit, 1, seed=(1 << 40) + 9, stream=stream_id(domain, c, 3), mode="hard",
                                    backend="reference")[0]
        assert torch.equal(masks[k], expected)
    assert 0 < masks.mean() < 1


def test_candidate_keep_gradient_is_zero_like_hard_gate_keep(backend):
    p_logit = torch.randn(9, dtype=torch.float64, requires_grad=True)
    masks = pf.ops.candidate_keep(p_logit, torch.tensor([1, 4]), seed=3, layer=0, backend=backend)
    (masks * torch.arange(18.0, dtype=torch.float64).view(2, 9)).sum().backward()
    assert torch.equal(p_logit.grad, torch.zeros(9, dtype=torch.float64))
    hard = pf.ops.gate_keep(p_logit, 1, seed=3, stream=stream_id(Domain.CANDIDATE, 1, 0), mode="hard", backend=backend)
    assert torch.equal(hard[0], masks[0])


@pytest.mark.gpu
def test_candidate_keep_on_the_gpu_equals_the_reference():
    p_logit = torch.randn(1000, device="cuda") * 2
    ids = torch.tensor([0, 7, 1 << 33, (1 << 40) - 1] + list(range(100, 1124)), device="cuda")
    want = pf.ops.candidate_keep(p_logit, ids, seed=(1 << 62) + 5, layer=211, backend="reference")
    for backend in ("cuda", "triton"):
        if pf.backends()[backend][0]:
            got = pf.ops.candidate_keep(p_logit, ids, seed=(1 << 62) + 5, layer=211, backend=backend)
            assert torch.equal(got, want), backend


def test_candidate_keep_bad_input():
    p = torch.randn(4)
    with pytest.raises(TypeError, match="candidates must have dtype"):
        pf.ops.candidate_keep(p, torch.tensor([1.0]), seed=0, layer=0)
    with pytest.raises(ValueError, match="candidates must be ids in"):
        pf.ops.candidate_keep(p, torch.tensor([-1]), seed=0, layer=0)
    with pytest.raises(ValueError, match="layer must be in"):
        pf.ops.candidate_keep(p, torch.tensor([1]), seed=0, layer=1 << 16)
    with pytest.raises(ValueError, match="seed must be in"):
        pf.ops.candidate_keep(p, torch.tensor([1]), seed=-1, layer=0)
    with pytest.raises(TypeError, match="domain must be"):
        pf.ops.candidate_keep(p, torch.tensor([1]), seed=0, layer=0, domain=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits super-network after a short search, with its held-out split."""
    out = tmp_path_factory.mktemp("run")
    config = configs.resolve("digits-tiny", {"epochs": 3, "candidates": 2, "random_baseline": 0})
    run_search(config, seed=1, out_dir=out, progress=False)
    splits = load_data(config)

    def load_model():
        return rebuild_for_evaluation(config, 10, torch.load(out / "checkpoint.pt", weights_only=False)["model"])

    return load_model(), splits.heldout, load_model


def test_a_recalibrating_pass_counts_its_recalibration_rows(trained):
    """--bn-recalibrate N runs N images per candidate through the pass before its held-out batches: a
    pass of rows_per_pass rows holds rows_per_pass // max(batch, N) candidates."""
    model, heldout, _ = trained
    images = heldout[0]
    scorer = CandidateScorer(model, *heldout, seed=1, batch_size=8, rows_per_pass=64)
    assert scorer.candidates_per_pass(0, 8) == 8
    recalibrating = CandidateScorer(model, *heldout, seed=1, batch_size=8, rows_per_pass=64,
                                    recalibration_images=images[:32])
    assert recalibrating.candidates_per_pass(0, 8) == 2
    assert recalibrating.candidates_per_pass(0, 300) == 2  # (batches of 8 held-out images)


def test_cpu_passes_hold_several_candidates_only_while_activations_are_small(trained, monkeypatch):
    """On a CPU a batched pass stops growing at CPU_PASS_BYTES of its largest activation (larger passes
    only lose per row there), never below one candidate's rows; the counts do not change."""
    from pgnas_fast.search import rank as rank_module

    model, heldout, _ = trained
    row_bytes = 16 * 8 * 8 * 4  # the digits network's largest activation per image: [16, 8, 8] float32
    scorer = CandidateScorer(model, *heldout, seed=1, batch_size=100, rows_per_pass=1000)
    assert scorer.candidates_per_pass(0, 300) == 10  # 4 KB rows: the cap (16 MB) leaves rows_per_pass
    expected = CandidateScorer(model, *heldout, seed=1, evaluator="sequential").correct(range(7), 0, 300)
    passes = []
    monkeypatch.setattr(CandidateScorer, "_correct_pass",
                        lambda self, m, group, start, end, real=CandidateScorer._correct_pass:
                        passes.append(len(group)) or real(self, m, group, start, end))
    for cap, per_pass in ((3 * 100 * row_bytes, 3), (100 * row_bytes - 1, 1)):
        monkeypatch.setattr(rank_module, "CPU_PASS_BYTES", cap)
        passes.clear()
        scorer = CandidateScorer(model, *heldout, seed=1, batch_size=100, rows_per_pass=1000)
        assert scorer.candidates_per_pass(0, 300) == per_pass
        assert scorer.correct(range(7), 0, 300) == expected
        assert passes == [per_pass] * (7 // per_pass) + ([7 % per_pass] if 7 % per_pass else [])


def test_a_gpu_pass_budget_is_a_share_of_the_memory_torch_can_still_use(monkeypatch):
    """On CUDA a pass's largest activation may take CUDA_ACTIVATION_SHARE of the free memory, the
    allocator's cached blocks counted as free (D-121 at 8,192 rows would not fit an 80 GB GPU)."""
    from pgnas_fast.search import rank as rank_module

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 12 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 << 30)
    assert rank_module.pass_bytes_budget(torch.device("cuda")) == int((60 + 8 << 30) * rank_module.CUDA_ACTIVATION_SHARE)
    assert rank_module.pass_bytes_budget(torch.device("cpu")) == rank_module.CPU_PASS_BYTES
    assert rank_module.pass_bytes_budget(torch.device("meta")) is None


def test_stacked_masks_equal_one_candidate_at_a_time(trained):
    model, _, _ = trained
    stacked = stacked_candidate_masks(model, 1, [4, 0, 9])
    for k, c in enumerate([4, 0, 9]):
        single = candidate_masks(model, 1, c)
        assert all(torch.equal(stacked[name][k], single[name]) for name, _ in gated_layers(model))


@pytest.mark.parametrize("rows_per_pass", [300, 1000, 8192])  # 1, 3 and all candidates per pass
def test_batched_sequential_and_reload_counts_are_identical(trained, rows_per_pass):
    model, heldout, load_model = trained
    ids = [0, 1, 2, 3, 7, 11, 12]
    counts = {}
    for evaluator in ("batched", "sequential", "reload"):
        scorer = CandidateScorer(model, *heldout, seed=1, evaluator=evaluator, batch_size=128,
                                 rows_per_pass=rows_per_pass, load_model=load_model)
        counts[evaluator] = scorer.correct(ids, 10, 290)
    assert counts["batched"] == counts["sequential"] == counts["reload"]
    assert len(set(counts["batched"])) > 1, "candidates should differ"


def test_the_reload_evaluator_reads_the_data_again_for_every_candidate(trained):
    """As the authors' selection loops did; the same counts, one read per candidate."""
    model, heldout, load_model = trained
    config = configs.resolve("digits-tiny")
    reads = []

    def load_heldout():
        reads.append(1)
        return load_data(config).heldout

    ids = [0, 3, 7, 12]
    expected = CandidateScorer(model, *heldout, seed=1, batch_size=128).correct(ids, 5, 300)
    scorer = CandidateScorer(model, *heldout, seed=1, evaluator="reload", batch_size=128, load_model=load_model,
                             load_heldout=load_heldout)
    assert scorer.correct(ids, 5, 300) == expected and len(reads) == len(ids)


@pytest.mark.parametrize("change", ["a label", "an image", "one image fewer"])
def test_the_reload_evaluator_refuses_data_that_changes_during_the_ranking(trained, change):
    from pgnas_fast.search.io import RunError

    model, (images, labels), load_model = trained
    if change == "a label":
        reread = images, torch.cat([(labels[:1] + 1) % 10, labels[1:]])
    elif change == "an image":
        reread = torch.cat([images[:-1], images[-1:] + 0.5]), labels
    else:
        reread = images[:-1], labels[:-1]
    scorer = CandidateScorer(model, images, labels, seed=1, evaluator="reload", load_model=load_model,
                             load_heldout=lambda: reread)
    with pytest.raises(RunError, match="held-out data read again for a candidate differs from the 300 images"):
        scorer.correct([0], 0, 300)


def test_batchnorm_without_running_statistics_ranks_one_candidate_a_pass():
    """Such a BatchNorm normalises with the batch's statistics in eval mode too: K candidates in one pass
    would share them, and their scores would depend on which candidates they were ranked with."""
    from pgnas_fast.nn import GatedConv2d

    torch.manual_seed(0)
    net = torch.nn.Sequential(GatedConv2d(3, 8, 3, padding=1, p_init=0.5),
                              torch.nn.BatchNorm2d(8, track_running_stats=False), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(128, 10))
    x, y = torch.randn(40, 3, 4, 4), torch.randint(0, 10, (40,))
    scorers = {e: CandidateScorer(net, x, y, seed=0, batch_size=8, evaluator=e) for e in ("batched", "sequential")}
    assert scorers["batched"].candidates_per_pass(0, 40) == 1
    rows = {e: rank(s, range(12), progress=False) for e, s in scorers.items()}
    assert rows["batched"] == rows["sequential"] and len({r["score"] for r in rows["batched"]}) > 1


def test_scores_equal_plain_accuracy_of_the_masked_network(trained):
    model, (images, labels), _ = trained
    rows = rank(CandidateScorer(model, images, labels, seed=1), [3, 8], progress=False)
    for row in rows:
        set_gates(model, "hard", candidate=row["id"], seed=1)
        model.eval()
        with torch.no_grad():
            expected = (model(images).argmax(1) == labels).sum().item() / len(labels)
        assert row["score"] == expected and row["images"] == len(labels)
    set_gates(model, "full")


def test_racing_round_ends_grow_by_eta():
    assert round_ends("exhaustive", 300, 3, 1 / 27) == [300]
    assert round_ends("racing", 300, 3, 1 / 27) == [12, 34, 100, 300]
    assert round_ends("racing", 300, 2, 0.5) == [150, 300]
    assert round_ends("racing", 8, 3, 1 / 27) == [1, 3, 8]  # ceil(8/27) = ceil(8/9) = 1: counted once
    # eta times more images each round, not one more where the float product lands just above a whole number
    # (0.1 x 3 x 300 = 90.00000000000001)
    assert round_ends("racing", 300, 3, 0.1) == [30, 90, 270, 300]
    assert round_ends("racing", 5000, 3, 0.1) == [500, 1500, 4500, 5000]
    assert round_ends("racing", 300, 3, 0.05) == [15, 45, 135, 300]


def test_racing_is_paired_and_finalists_get_full_scores(trained):
    model, heldout, _ = trained
    scorer = CandidateScorer(model, *heldout, seed=1)
    ids = list(range(40))
    racing = rank(scorer, ids, strategy="racing", eta=3, first_share=1 / 9, progress=False)
    exhaustive = {r["id"]: r for r in rank(scorer, ids, progress=False)}
    images = sorted({r["images"] for r in racing})
    assert images == [34, 100, 300]
    assert sum(r["images"] == 300 for r in racing) == 5  # 40 -> 14 -> 5
    for r in racing:
        if r["images"] == 300:
            assert r["score"] == exhaustive[r["id"]]["score"]
    # paired: every candidate's first-round count is over the same 34 images
    first = {r["id"]: round(r["score"] * r["images"]) for r in rank(scorer, ids, strategy="racing", eta=3,
                                                                     first_share=1 / 9, progress=False)}
    assert first == {r["id"]: round(r["score"] * r["images"]) for r in racing}
    winner = best_candidate(racing)
    assert winner["images"] == 300
    # the score every candidate has on the same images: its first round's
    counts = scorer.correct(ids, 0, 34)
    assert [r["first_round_score"] for r in racing] == [n / 34 for n in counts]
    assert all(r["first_round_score"] == r["score"] for r in exhaustive.values())


def test_a_lone_candidate_races_on_everyones_first_share(trained):
    """One candidate (e.g. a random baseline of 1) takes the same rounds as many, so its first-round score
    covers the images every other family's first round covers."""
    model, heldout, _ = trained
    scorer = CandidateScorer(model, *heldout, seed=1)
    [alone] = rank(scorer, [7], strategy="racing", eta=3, first_share=1 / 9, progress=False)
    [whole] = rank(scorer, [7], progress=False)
    assert alone["images"] == 300 and alone["score"] == whole["score"]
    assert alone["first_round_score"] == scorer.correct([7], 0, 34)[0] / 34


def test_logged_rows_count_only_on_their_rounds_images(trained, tmp_path):
    """A progress row whose images are not its round's (a log from another round layout) is evaluated
    again, never added to the candidate's count."""
    model, heldout, _ = trained
    scorer = CandidateScorer(model, *heldout, seed=1)
    log = ProgressLog(tmp_path)
    whole = scorer.correct([3], 0, 300)[0]
    log.append([{"round": 0, "id": 3, "correct": whole, "start": 0, "end": 300}])  # one round over everything
    kwargs = dict(strategy="racing", eta=3, first_share=1 / 9, progress=False)
    resumed = rank(scorer, [3, 4], log=log, **kwargs)
    assert resumed == rank(scorer, [3, 4], **kwargs)
    assert next(r for r in resumed if r["id"] == 3)["first_round_score"] == scorer.correct([3], 0, 34)[0] / 34
    assert log.restored == 0  # (what `rank` and a search report as resumed evaluations)
    # a valid row is kept whatever file order puts a stale one of the same key after it
    ProgressLog(tmp_path, rank=1).append([{"round": 0, "id": 3, "correct": whole, "start": 0, "end": 300}])
    assert log.load([(0, 34), (34, 100), (100, 300)])[(0, 3)]["end"] == 34
    # every evaluation of the ranking above restored: both candidates' round 0, the survivor's rounds 1 and 2
    assert rank(scorer, [3, 4], log=log, **kwargs) == resumed and log.restored == 2 + 1 + 1


class Killed(Exception):
    pass


def test_ranking_resumes_after_a_kill_without_repeating_work(trained, tmp_path):
    model, heldout, _ = trained
    calls = []

    class CountingScorer(CandidateScorer):
        die_at = None

        def correct(self, candidates, start, end):
            calls.append((tuple(candidates), start, end))
            if len(calls) == self.die_at:
                raise Killed
            return super().correct(candidates, start, end)

    ids = list(range(30))
    kwargs = dict(strategy="racing", eta=3, first_share=1 / 9, chunk=8, progress=False)
    dying = CountingScorer(model, *heldout, seed=1)
    dying.die_at = 3  # two chunks of round 0 finished, killed in the third
    with pytest.raises(Killed):
        rank(dying, ids, log=ProgressLog(tmp_path), **kwargs)
    finished = {c for group, _, _ in calls[:2] for c in group}
    calls.clear()
    resumed = rank(CountingScorer(model, *heldout, seed=1), ids, log=ProgressLog(tmp_path), **kwargs)
    evaluated_again = {c for group, start, _ in calls if start == 0 for c in group}
    assert len(finished) == 16 and not finished & evaluated_again
    assert evaluated_again == set(ids) - finished
    assert resumed == rank(CandidateScorer(model, *heldout, seed=1), ids, **kwargs)


def test_rank_rejects_bad_arguments(trained):
    model, heldout, _ = trained
    scorer = CandidateScorer(model, *heldout, seed=1)
    with pytest.raises(ValueError, match="strategy"):
        rank(scorer, [0], strategy="greedy", progress=False)
    with pytest.raises(ValueError, match="eta >= 2"):
        rank(scorer, [0], strategy="racing", eta=1, progress=False)
    with pytest.raises(ValueError, match="evaluator"):
        CandidateScorer(model, *heldout, seed=1, evaluator="fast")
    with pytest.raises(ValueError, match="load_model"):
        CandidateScorer(model, *heldout, seed=1, evaluator="reload")
    with pytest.raises(ValueError, match="load_heldout is the reload evaluator's .* not the sequential one's"):
        CandidateScorer(model, *heldout, seed=1, evaluator="sequential", load_heldout=lambda: heldout)


# ---- pgnas-fast rank ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rankrun")
    run_search(configs.resolve("digits-tiny", {"epochs": 3, "candidates": 2, "random_baseline": 0}), seed=2,
               out_dir=out, progress=False)
    return out


def _rank_cli(capsys, *argv):
    from pgnas_fast.cli import main

    code = main(["rank", *map(str, argv), "--quiet"])
    return code, capsys.readouterr()


def test_the_reload_evaluator_refuses_a_checkpoint_that_changes_during_the_ranking(capsys, run_dir, tmp_path,
                                                                                   monkeypatch):
    """It reads checkpoint.pt for every candidate, as the authors did; a `search --resume` training the run
    meanwhile would give later candidates later weights, and the ranking would record the first epoch."""
    import shutil

    from pgnas_fast.search import rank_run as rank_run_module

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    real = rank_run_module.rebuild_for_evaluation
    calls = []

    def train_on_after_the_first_candidate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second candidate's model: an epoch more is saved before the third's
            state = torch.load(run / "checkpoint.pt", weights_only=False)
            torch.save({**state, "epoch": state["epoch"] + 1}, run / "checkpoint.pt")
        return real(*args, **kwargs)

    monkeypatch.setattr(rank_run_module, "rebuild_for_evaluation", train_on_after_the_first_candidate)
    code, captured = _rank_cli(capsys, run, "--candidates", 3, "--strategy", "exhaustive", "--evaluator", "reload")
    assert code == 2 and captured.err.count("\n") == 1, captured.err
    assert "checkpoint.pt' changed during the ranking (epoch 3, now 4): the run is training" in captured.err


def test_the_rank_commands_reload_evaluator_reads_the_run_and_its_data_per_candidate(capsys, run_dir, tmp_path,
                                                                                     monkeypatch):
    """`--evaluator reload` is the authors' loop: for every candidate the data set read again, the model rebuilt
    and the checkpoint loaded; its table equals the batched evaluator's."""
    import shutil

    from pgnas_fast.search import rank_run as rank_run_module
    from pgnas_fast.search.io import read_jsonl

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    calls = {"load_data": 0, "rebuild_for_evaluation": 0}
    for name in calls:
        def counted(*args, real=getattr(rank_run_module, name), name=name, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(rank_run_module, name, counted)
    tables = {}
    for evaluator in ("reload", "batched"):
        code, captured = _rank_cli(capsys, run, "--candidates", 5, "--strategy", "exhaustive", "--evaluator", evaluator,
                                   "--tag", evaluator)
        assert code == 0, captured.err
        tables[evaluator] = read_jsonl(run / f"rank-{evaluator}" / "candidates.jsonl")
        if evaluator == "reload":
            assert calls == {"load_data": 5, "rebuild_for_evaluation": 5}
    assert tables["reload"] == tables["batched"]
    assert calls == {"load_data": 5, "rebuild_for_evaluation": 5}  # (batched: read once, by load_run)


def test_rank_command_writes_table_and_top(capsys, run_dir):
    code, captured = _rank_cli(capsys, run_dir, "--candidates", 60, "--strategy", "exhaustive", "--tag", "ex", "--top", 3)
    assert code == 0 and "best candidate:" in captured.out
    from pgnas_fast.search.io import read_jsonl
    import json

    rows = read_jsonl(run_dir / "rank-ex" / "candidates.jsonl")
    assert [r["id"] for r in rows] == list(range(60)) and all(r["images"] == 300 for r in rows)
    top = json.loads((run_dir / "rank-ex" / "top.json").read_text())
    assert len(top) == 3 and top[0]["candidate"] == best_candidate(rows)["id"]
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    code, _ = _rank_cli(capsys, run_dir, "--candidates", 60, "--strategy", "racing", "--tag", "race")
    racing = read_jsonl(run_dir / "rank-race" / "candidates.jsonl")
    assert sum(r["images"] for r in racing) * 4 < sum(r["images"] for r in rows)
    assert score_rank(rows, best_candidate(racing)["id"]) <= 3


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent/run"], "is not a run directory: config.json is missing"),
    (["RUN", "--candidates", "0"], "--candidates: must be an integer >= 1"),
    (["RUN", "--tag", "a/b"], "--tag must be letters"),
    (["RUN", "--tag", "a" * 201], "--tag must be at most 200 characters, got 201"),  # (a file name's 255 bytes)
    (["RUN", "--tag", "search"], "--tag 'search' is taken: rank-search/ holds the search's own ranking log"),
    (["RUN", "--tag", "search-random"], "--tag 'search-random' is taken"),
    (["RUN", "--first-share", "1.5"], "--first-share must be in (0, 1]"),
    (["RUN", "--first-share", "0"], "--first-share must be in (0, 1]"),
    (["RUN", "--strategy", "exhaustive", "--first-share", "0.5"],
     "--first-share sets racing's rounds: it takes --strategy racing, not exhaustive"),
    (["RUN", "--strategy", "exhaustive", "--eta", "3"],
     "--eta sets racing's rounds: it takes --strategy racing, not exhaustive"),
    (["RUN", "--strategy", "exhaustive", "--eta", "3", "--first-share", "0.5"], "--eta and --first-share set racing's rounds: they take"),
    (["RUN", "--strategy", "greedy"], "invalid choice"),
    (["RUN", "--bn-recalibrate", "100000"], "--bn-recalibrate 100000 asks for more images than the run's"),
])
def test_rank_command_bad_input(capsys, run_dir, argv, message):
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    code, captured = _rank_cli(capsys, *argv)
    assert code == 2 and message in captured.err and captured.err.count("\n") == 1


def test_rank_takes_the_run_s_ranking_strategy_by_default(capsys, run_dir):
    """Without --strategy, rank ranks as the run's search did (config key ranking; digits: exhaustive), so
    `rank` of the checkpoint gives the search's own table."""
    code, captured = _rank_cli(capsys, run_dir, "--candidates", 2, "--tag", "as-searched")
    assert code == 0 and "exhaustive with the batched evaluator" in captured.out
    assert (run_dir / "rank-as-searched" / "candidates.jsonl").read_text() == (run_dir / "candidates.jsonl").read_text()
    code, captured = _rank_cli(capsys, run_dir, "--tag", "as-many")  # and as many candidates as it ranked
    searched = json.loads((run_dir / "config.json").read_text())["config"]["candidates"]
    assert code == 0 and json.loads((run_dir / "rank-as-many" / "summary.json").read_text())["candidates"] == searched
    assert f"of {searched}, held-out accuracy" in captured.out
    code, captured = _rank_cli(capsys, run_dir, "--candidates", 2, "--eta", 3)
    assert code == 2 and ("--eta sets racing's rounds: it takes --strategy racing, not exhaustive (the run's config "
                          "key ranking, taken without --strategy)") in captured.err


def test_rank_and_export_of_an_unfinished_search_say_so(capsys, run_dir, tmp_path):
    """A run still training (or stopped) has no summary.json: its readers name the checkpoint's epoch."""
    import shutil

    from pgnas_fast.cli import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    note = (f"note: the search in {str(run)!r} has not finished (its training ended but its ranking did not "
            "(stopped, or no drawn candidate fit its budget)): its checkpoint.pt is of epoch 3 of 3")
    code, captured = _rank_cli(capsys, run_dir, "--candidates", 2, "--tag", "finished")
    assert code == 0 and "note: the search" not in captured.err
    (run / "summary.json").unlink()
    code, captured = _rank_cli(capsys, run, "--candidates", 2, "--tag", "early")
    assert code == 0 and captured.err.startswith(note)
    assert main(["export", str(run), "--candidate", "1", "--out", str(tmp_path / "export")]) == 0
    assert capsys.readouterr().err.startswith(note)
    log = (run / "train_log.jsonl").read_text().splitlines(keepends=True)
    (run / "train_log.jsonl").write_text("".join(log[:2]))  # as while its third epoch trains
    assert _rank_cli(capsys, run, "--candidates", 2, "--tag", "earlier")[1].err.startswith(
        f"note: the search in {str(run)!r} has not finished (still training, or stopped): its checkpoint.pt is of "
        "epoch 3 of 3")


def test_rank_resume_says_how_much_was_done_before(capsys, run_dir):
    code, captured = _rank_cli(capsys, run_dir, "--candidates", 30, "--strategy", "exhaustive", "--tag", "again",
                               "--resume")  # nothing under the tag yet
    assert code == 0 and "nothing to resume in" in captured.err and "rank-again' (no ranking under --tag again" in \
        captured.err and "before this --resume" not in captured.out
    code, captured = _rank_cli(capsys, run_dir, "--candidates", 30, "--strategy", "exhaustive", "--tag", "again")
    assert code == 2 and captured.err == (f"pgnas-fast: error: {str(run_dir / 'rank-again')!r} holds a ranking "
                                          "(finished): --resume continues it, --overwrite replaces it, or rank under "
                                          "another --tag\n")  # (hours of ranking are not replaced by a missed flag)
    code, captured = _rank_cli(capsys, run_dir, "--candidates", 30, "--strategy", "exhaustive", "--tag", "again",
                               "--overwrite")
    assert code == 0 and "before this --resume" not in captured.out
    seconds = json.loads((run_dir / "rank-again" / "summary.json").read_text())["seconds"]
    assert f"  time: ranking {seconds:.1f} s ({30 / seconds:.1f} candidates/s)\n" in captured.out
    code, captured = _rank_cli(capsys, run_dir, "--candidates", 30, "--strategy", "exhaustive", "--tag", "again",
                               "--resume")
    assert code == 0
    assert "9,000 candidate-images evaluated (30 candidate-rounds restored from before this --resume)" in captured.out


def test_rank_resume_refuses_other_settings(capsys, run_dir):
    """A ranking resumes only with the settings it started with: other rounds would mix scores (the
    progress rows of eta 4 read as eta 2's gave accuracies over 100%); the evaluator may change."""
    import json

    def argv(**changes):
        options = {"--candidates": 40, "--tag": "resumed", "--strategy": "racing", **changes}
        return [item for pair in options.items() for item in pair]

    code, captured = _rank_cli(capsys, run_dir, *argv())
    assert code == 0
    # racing's first cut and the tie for best, as the rows say; a cut that dropped ties by id is said
    from pgnas_fast.search.rank import cut_note, first_round_cut, tied_for_best

    summary = json.loads((run_dir / "rank-resumed" / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "rank-resumed" / "candidates.jsonl").read_text().splitlines()]
    assert summary["first_round_cut"] == first_round_cut(rows) and summary["first_round_cut"]["places"] == 10
    assert summary["tied_for_best"] == tied_for_best(rows)
    note = cut_note(summary["first_round_cut"])
    assert (f"  note: {note}\n" in captured.out) if note else "note:" not in captured.out
    settings = json.loads((run_dir / "rank-resumed" / "settings.json").read_text())
    assert settings == {"strategy": "racing", "candidates": 40, "bn_recalibrate": 0, "eta": 4, "first_share": 0.0625,
                        "checkpoint": "last", "checkpoint_epoch": 3, "device": "cpu", "max_params": 0, "max_macs": 0}
    for option, value, message in (("--eta", 2, "eta 4 (now 2)"), ("--bn-recalibrate", 64, "bn_recalibrate 0 (now 64)"),
                                   ("--candidates", 41, "candidates 40 (now 41)"),
                                   ("--max-params", 10**9, "max_params 0 (now 1000000000)"),
                                   ("--strategy", "exhaustive", "started with strategy 'racing' (now 'exhaustive');")):
        code, captured = _rank_cli(capsys, run_dir, *argv(**{option: value}), "--resume")
        assert code == 2 and message in captured.err and captured.err.count("\n") == 1, captured.err
    # (racing's eta and first share follow from the strategy: named only where both race)
    # rows scored on another device type are refused too; a settings.json older than the entry is not
    path = run_dir / "rank-resumed" / "settings.json"
    path.write_text(json.dumps({**settings, "device": "cuda"}))
    code, captured = _rank_cli(capsys, run_dir, *argv(), "--resume")
    assert code == 2 and "device 'cuda' (now 'cpu')" in captured.err
    # (and one older than the checkpoint and budget entries: the last checkpoint, no budget)
    path.write_text(json.dumps({k: v for k, v in settings.items()
                                if k not in ("device", "checkpoint", "max_params", "max_macs")}))
    code, captured = _rank_cli(capsys, run_dir, *argv(**{"--evaluator": "sequential"}), "--resume")
    assert code == 0 and "held-out accuracy" in captured.out


def test_rank_resume_refuses_progress_rows_it_cannot_trust(capsys, run_dir):
    """A valid JSON line that is no progress row, or rows without the settings they were scored with,
    are refused (a kill only ever cuts a line, which is evaluated again)."""
    assert _rank_cli(capsys, run_dir, "--candidates", "4", "--strategy", "exhaustive", "--tag", "trust")[0] == 0
    out = run_dir / "rank-trust"
    with open(out / "progress-rank0.jsonl", "a") as f:
        f.write('{"id": 3}\n')
    code, captured = _rank_cli(capsys, run_dir, "--candidates", "4", "--strategy", "exhaustive", "--tag", "trust",
                               "--resume")
    assert code == 2 and "progress-rank0.jsonl' line 5 is not a progress row (integer round, id" in captured.err
    (out / "settings.json").unlink()
    lines = (out / "progress-rank0.jsonl").read_text().splitlines()
    (out / "progress-rank0.jsonl").write_text(lines[0] + "\n")
    code, captured = _rank_cli(capsys, run_dir, "--candidates", "4", "--strategy", "racing", "--tag", "trust",
                               "--resume")
    assert code == 2 and "holds progress rows but no readable settings.json" in captured.err


def test_rank_resume_refuses_a_checkpoint_trained_on_since(capsys, run_dir, tmp_path):
    """`rank` takes a run that is still training; a `search --resume` then replaces its checkpoint,
    and the ranking's rows are of the old weights."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert _rank_cli(capsys, run, "--candidates", 20, "--tag", "x")[0] == 0
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["epoch"] += 1
    torch.save(state, run / "checkpoint.pt")
    code, captured = _rank_cli(capsys, run, "--candidates", 20, "--tag", "x", "--resume")
    assert code == 2 and captured.err.count("\n") == 1
    assert "ranked the checkpoint.pt of epoch 3, but the run has trained on since (now epoch 4)" in captured.err
    assert "rank afresh (--overwrite) or under another --tag" in captured.err
    assert _rank_cli(capsys, run, "--candidates", 20, "--tag", "x", "--overwrite")[0] == 0  # afresh


def test_rank_study_and_export_read_the_best_checkpoint_when_asked(capsys, run_dir, tmp_path):
    """--checkpoint best reads checkpoint-best.pt (here other weights, of an earlier epoch): the scores,
    the recorded epoch and the export are of those weights; a ranking of one checkpoint is neither resumed
    nor exported from the other."""
    import shutil

    from pgnas_fast.cli import main
    from pgnas_fast.search.io import read_jsonl
    from pgnas_fast.search.rank import accuracy
    from pgnas_fast.search.run import load_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    torch.manual_seed(0)
    state["epoch"] = 2
    state["model"] = {k: v + 0.05 * torch.randn_like(v) if k.endswith("weight") and v.dim() == 4 else v
                      for k, v in state["model"].items()}
    torch.save(state, run / "checkpoint-best.pt")
    best, last = load_run(run, checkpoint="best"), load_run(run)
    assert (best.epoch, best.checkpoint, last.epoch, last.checkpoint) == (2, "best", 3, "last")
    scorer = {name: CandidateScorer(loaded.model, *loaded.feed.split("heldout"), seed=loaded.seed)
              for name, loaded in (("best", best), ("last", last))}
    counts = {name: s.correct(list(range(12)), 0, s.size) for name, s in scorer.items()}
    assert counts["best"] != counts["last"]  # other weights, other scores

    code, captured = _rank_cli(capsys, run, "--candidates", 12, "--tag", "b", "--checkpoint", "best", "--top", 1)
    assert code == 0 and "weights: checkpoint-best.pt, of epoch 2 (the lowest training objective)" in captured.out
    rows = read_jsonl(run / "rank-b" / "candidates.jsonl")
    assert [round(r["score"] * scorer["best"].size) for r in rows] == counts["best"]
    summary = json.loads((run / "rank-b" / "summary.json").read_text())
    assert (summary["checkpoint"], summary["checkpoint_epoch"]) == ("best", 2)
    settings = json.loads((run / "rank-b" / "settings.json").read_text())
    assert settings["checkpoint"] == "best"
    code, captured = _rank_cli(capsys, run, "--candidates", 12, "--tag", "b", "--resume")
    assert code == 2 and ("ranks the best checkpoint (checkpoint-best.pt), this resume asks for the last: resume it "
                          "with --checkpoint best") in captured.err
    assert _rank_cli(capsys, run, "--candidates", 12, "--tag", "b", "--resume", "--checkpoint", "best")[0] == 0
    # the default ranks the last weights
    assert _rank_cli(capsys, run, "--candidates", 12, "--tag", "l")[0] == 0
    assert json.loads((run / "rank-l" / "settings.json").read_text())["checkpoint"] == "last"
    assert [round(r["score"] * 300) for r in read_jsonl(run / "rank-l" / "candidates.jsonl")] == counts["last"]

    # export --rank takes the ranking's checkpoint; another one is refused
    assert main(["export", str(run), "--rank", "b", "--out", str(tmp_path / "e")]) == 0
    exported = json.loads((tmp_path / "e" / "export.json").read_text())
    assert (exported["checkpoint"], exported["checkpoint_epoch"]) == ("best", 2)
    assert exported["candidate"] == summary["best"]["id"]
    set_gates(best.model, "hard", masks=candidate_masks(best.model, best.seed, exported["candidate"]))
    assert exported["test_accuracy"] == accuracy(best.model, best.feed.eval_batches("test"))
    capsys.readouterr()
    assert main(["export", str(run), "--rank", "b", "--checkpoint", "last", "--out", str(tmp_path / "f")]) == 2
    assert ("the ranking under --rank b read checkpoint-best.pt, not the checkpoint.pt that --checkpoint last asks "
            "for: leave --checkpoint out (the ranking's is taken)") in capsys.readouterr().err
    assert main(["export", str(run), "--candidate", "3", "--checkpoint", "best", "--out", str(tmp_path / "g")]) == 0
    capsys.readouterr()
    # the search's own choice is a draw from the last checkpoint: not exported with the best one's weights
    assert main(["export", str(run), "--checkpoint", "best", "--out", str(tmp_path / "h")]) == 2
    assert ("the search chose its candidate (architecture.json) among draws from checkpoint.pt; the same id drawn "
            "from checkpoint-best.pt is another network") in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
    assert json.loads((tmp_path / "g" / "export.json").read_text())["checkpoint_epoch"] == 2
    assert main(["study", str(run), "--candidates", "4", "--checkpoint", "best", "--quiet"]) == 0
    assert "weights: checkpoint-best.pt, of epoch 2 (the lowest training objective)" in capsys.readouterr().out
    study = json.loads((run / "study-default" / "study.json").read_text())
    assert (study["checkpoint"], study["checkpoint_epoch"]) == ("best", 2)
    markdown = (run / "study-default" / "study.md").read_text()
    assert "(of 3; checkpoint-best.pt, the lowest training objective)" in markdown
    assert main(["train", str(run), "--candidate", "3", "--checkpoint", "best", "--epochs", "1", "--quiet"]) == 0
    assert "\n  checkpoint: checkpoint-best.pt, of epoch 2 (the lowest training objective)\n" in capsys.readouterr().out
    (run / "checkpoint-best.pt").unlink()
    code, captured = _rank_cli(capsys, run, "--candidates", 2, "--tag", "gone", "--checkpoint", "best")
    assert code == 2 and "checkpoint-best.pt' is missing: the run has no best checkpoint" in captured.err


def test_corrupt_checkpoints_are_one_line_errors(capsys, run_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    whole = (run_dir / "checkpoint.pt").read_bytes()
    for content, detail in ((whole[:1000], "RuntimeError"), (b"", "EOFError"), (b"hello\n", "")):
        (broken / "checkpoint.pt").write_bytes(content)
        code, captured = _rank_cli(capsys, broken, "--candidates", 2)
        assert code == 2 and captured.err.count("\n") == 1, captured.err
        assert "checkpoint.pt' is not a readable checkpoint" in captured.err and detail in captured.err
    torch.save({"epoch": 1}, broken / "checkpoint.pt")  # readable, but not ours
    code, captured = _rank_cli(capsys, broken, "--candidates", 2)
    assert code == 2 and captured.err.count("\n") == 1
    assert "checkpoint.pt' is not a pgnas-fast checkpoint (no model state in it)" in captured.err


def test_rank_command_refuses_an_incompatible_checkpoint(capsys, run_dir, tmp_path):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["config"]["supernet_args"]["width"] = 8
    (broken / "config.json").write_text(json.dumps(config))
    code, captured = _rank_cli(capsys, broken, "--candidates", 2)
    assert code == 2 and "does not belong to this run's config.json: it was trained with supernet_args" in captured.err
    assert "'width': 16" in captured.err and "(now {" in captured.err and "'width': 8" in captured.err


@pytest.mark.parametrize("budgeted", [False, True])
def test_sharded_ranking_equals_one_process(run_dir, budgeted):
    """torchrun, 2 CPU processes under gloo: the same table, byte for byte; under a size budget the ranks
    size their shares of the candidates and rank the same ones."""
    import subprocess
    import sys

    base = [str(run_dir), "--candidates", "40", "--quiet"]
    if budgeted:  # the median size: half of them fit
        from pgnas_fast.search.budget import candidate_sizes
        from pgnas_fast.search.run import load_run

        loaded = load_run(run_dir)
        sizes = candidate_sizes(loaded.model, loaded.seed, range(40), configs.input_shape(loaded.config),
                                progress=False)
        base += ["--max-params", sorted(s["params"] for s in sizes.values())[19]]
    tag = "budget-" if budgeted else ""
    single = subprocess.run([sys.executable, "-m", "pgnas_fast.cli", "rank", *map(str, base), "--tag", f"{tag}one"],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "pgnas_fast.cli", "rank", *map(str, base), "--tag", f"{tag}two"],
                             capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    table = (run_dir / f"rank-{tag}one" / "candidates.jsonl").read_bytes()
    assert (run_dir / f"rank-{tag}two" / "candidates.jsonl").read_bytes() == table
    assert len(table.splitlines()) == (20 if budgeted else 40)  # (ties at the median: none in this run)
    assert sorted(p.name for p in (run_dir / f"rank-{tag}two").glob("progress-rank*.jsonl")) == [
        "progress-rank0.jsonl", "progress-rank1.jsonl"]


@pytest.mark.slow
def test_racing_keeps_the_exhaustive_winner_in_its_top_3(tmp_path):
    """Issue 6: on at least 4 of 5 digits seeds, with 1000 candidates, racing's winner scores inside
    the exhaustive top 3 (by score, ties sharing a rank); and racing reads >= 5x fewer images."""
    hits, ratios = 0, []
    for seed in range(5):
        out = tmp_path / str(seed)
        run_search(configs.resolve("digits-tiny", {"candidates": 2, "random_baseline": 0}), seed=seed, out_dir=out,
                   progress=False)
        loaded_model = rebuild_for_evaluation(configs.resolve("digits-tiny"), 10,
                                              torch.load(out / "checkpoint.pt", weights_only=False)["model"])
        scorer = CandidateScorer(loaded_model, *load_data(configs.resolve("digits-tiny")).heldout, seed=seed)
        exhaustive = rank(scorer, range(1000), progress=False)
        racing = rank(scorer, range(1000), strategy="racing", progress=False)
        hits += score_rank(exhaustive, best_candidate(racing)["id"]) <= 3
        ratios.append(sum(r["images"] for r in exhaustive) / sum(r["images"] for r in racing))
    assert hits >= 4, hits
    assert min(ratios) >= 5, ratios


# ---- BatchNorm recalibration --------------------------------------------------------------------
def _recalibrated_by_torch(model, candidate, seed, recal_images, images):
    """The plain-PyTorch oracle: a copy of the model whose BatchNorms take the statistics of one
    training-mode pass over recal_images (momentum None = cumulative average of that one batch)."""
    import copy

    clone = copy.deepcopy(model)
    set_gates(clone, "hard", candidate=candidate, seed=seed)
    clone.eval()
    for module in clone.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
            module.train()
    with torch.no_grad():
        clone(recal_images)
        clone.eval()
        return clone(images)


def test_grouped_batchnorm_equals_torch_recalibration(trained):
    from pgnas_fast.nn.batchnorm import grouped_batchnorm

    model, (images, _), _ = trained
    recal = load_data(configs.resolve("digits-tiny")).train[0][:64]
    ids = [2, 5, 9]
    model.eval()
    set_gates(model, "hard", masks=stacked_candidate_masks(model, 1, ids))
    with torch.no_grad(), grouped_batchnorm(model, len(ids)) as statistics:
        model(recal.repeat(len(ids), 1, 1, 1))
        statistics.mode = "apply"
        grouped = model(images[:50].repeat(len(ids), 1, 1, 1)).view(len(ids), 50, -1)
    set_gates(model, "full")
    for k, c in enumerate(ids):
        expected = _recalibrated_by_torch(model, c, 1, recal, images[:50])
        torch.testing.assert_close(grouped[k], expected, rtol=1e-4, atol=1e-4)
    # and the patch is gone: plain eval BatchNorm again
    assert all("forward" not in vars(m) for m in model.modules())


def test_recalibrated_ranking_batched_equals_sequential(trained):
    model, heldout, load_model = trained
    recal = load_data(configs.resolve("digits-tiny")).train[0][:100]
    counts = {}
    for evaluator in ("batched", "sequential", "reload"):
        scorer = CandidateScorer(model, *heldout, seed=1, evaluator=evaluator, recalibration_images=recal,
                                 load_model=load_model)
        counts[evaluator] = scorer.correct(list(range(6)), 0, 300)
    assert counts["batched"] == counts["sequential"] == counts["reload"]
    plain = CandidateScorer(model, *heldout, seed=1).correct(list(range(6)), 0, 300)
    assert plain != counts["batched"], "recalibration should change some scores"


@pytest.mark.parametrize("name, knobs, channels_last", [
    ("digits-tiny", {"width": 12}, True),
    ("supnet-m", {"k": 1, "blocks_per_stage": 1}, False),
    ("supnet-e", {"filters": 8, "num_layers": 3}, True),
    ("supnet-r50", {"layers": (1, 1, 1, 1), "base_width": 8}, False),
])
def test_folded_batchnorm_matches_the_unfolded_pass_and_restores_the_model(name, knobs, channels_last):
    """Evaluation folds each eval BatchNorm that follows a conv into it: the same logits up to rounding,
    for K candidates at once, and afterwards the very same modules, Parameters and outputs."""
    from pgnas_fast.nn.batchnorm import BATCHNORM_2D, folded_batchnorm

    torch.manual_seed(0)
    model = supernets.create(name, num_classes=7, p_init=0.3, **knobs)
    for bn in (m for m in model.modules() if isinstance(m, BATCHNORM_2D)):  # statistics far from (0, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.2, 3)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    size, channels = (8, 1) if name == "digits-tiny" else (32 if name != "supnet-r50" else 64, 3)
    images = torch.randn(6, channels, size, size)
    set_gates(model, "hard", masks=stacked_candidate_masks(model, 3, [0, 1]))
    before = {n: (p, p.clone()) for n, p in model.named_parameters()}
    modules = list(model.modules())
    with torch.no_grad():
        unfolded = model(images)
        with folded_batchnorm(model):
            folded_modules = sum(isinstance(m, BATCHNORM_2D) for m in modules) - sum(
                isinstance(m, BATCHNORM_2D) for m in model.modules())
            convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None
                     and not m.bias.requires_grad]
            folded = model(images)
        after = model(images)
    assert folded_modules > 0 and len(convs) == folded_modules
    assert all(c.weight.stride() == before[n + ".weight"][0].stride()
               for n, c in model.named_modules() if c in convs)  # (the same conv kernel runs)
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-4)
    assert not torch.equal(folded, unfolded)  # (folding rounds otherwise: the pass did change)
    assert list(model.modules()) == modules and torch.equal(after, unfolded)
    assert all(p is before[n][0] and torch.equal(p, before[n][1]) for n, p in model.named_parameters())
    set_gates(model, "full")


def test_folded_batchnorm_leaves_training_mode_and_unfollowed_batchnorm_alone():
    from pgnas_fast.nn import GatedConv2d, set_posterior
    from pgnas_fast.nn.batchnorm import folded_batchnorm

    conv, bn, pre = torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(3)
    net = torch.nn.Sequential(pre, conv, bn)  # pre precedes the conv: nothing to fold it into
    with folded_batchnorm(net.train()):
        assert list(net) == [pre, conv, bn]  # training mode: batch statistics, not constants
    with folded_batchnorm(net.eval()):
        assert net[0] is pre and isinstance(net[2], torch.nn.Identity) and net[1].bias is not None
    assert list(net) == [pre, conv, bn] and conv.bias is None
    # restored when the block raises
    with pytest.raises(KeyError), folded_batchnorm(net):
        raise KeyError
    assert list(net) == [pre, conv, bn] and conv.bias is None
    # a conv in two containers (the second BatchNorm would see the first one's scale) is left alone
    twice = torch.nn.ModuleList([torch.nn.Sequential(conv, bn), torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4))])
    with folded_batchnorm(twice.eval()):
        assert all(isinstance(s[1], torch.nn.BatchNorm2d) for s in twice) and conv.bias is None
    # and so is one held in one Sequential and read bare elsewhere (the bare read would get the fold)
    bare = torch.nn.ModuleDict({"seq": torch.nn.Sequential(conv, bn), "alone": conv}).eval()
    with folded_batchnorm(bare):
        assert isinstance(bare["seq"][1], torch.nn.BatchNorm2d) and conv.bias is None
    # a conv that samples Gaussian noise on its output is left alone (the noise's scale would change)
    gaussian = torch.nn.Sequential(GatedConv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4)).eval()
    set_posterior(gaussian, "gaussian")
    set_gates(gaussian, "relaxed", seed=0, step=0)
    with folded_batchnorm(gaussian):
        assert isinstance(gaussian[1], torch.nn.BatchNorm2d)
    set_gates(gaussian, "hard", masks={"0": torch.ones(3)})
    with folded_batchnorm(gaussian):
        assert isinstance(gaussian[1], torch.nn.Identity)


def test_every_evaluation_pass_runs_folded(trained):
    """accuracy() and the scorer's passes (without recalibration) never run a BatchNorm that follows a
    conv: the digits network has no other."""
    from pgnas_fast.search.rank import accuracy

    model, (images, labels), _ = trained
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model.eval()(images[:4])
        assert len(calls) == len(hooks) > 0  # (the hooks count)
        calls.clear()
        accuracy(model, [(images[:50], labels[:50])])
        CandidateScorer(model, images[:50], labels[:50], seed=1).correct([0, 1], 0, 50)
        assert calls == []
    finally:
        for hook in hooks:
            hook.remove()


def test_scoring_folds_a_gaussian_network_left_relaxed_by_training():
    """Training leaves the gates 'relaxed'; a Gaussian conv sampling noise is not folded, so scoring puts
    the gates 'full' first (every pass sets hard ones): the first call folds as every later one does."""
    from pgnas_fast.nn import set_posterior

    torch.manual_seed(0)
    model = supernets.create("digits-tiny")
    set_posterior(model, "gaussian")
    set_gates(model.train(), "relaxed", seed=0, step=3)
    images, labels = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        first = CandidateScorer(model, images, labels, seed=1).correct([0, 1, 2], 0, 40)
        assert calls == []
        assert CandidateScorer(model, images, labels, seed=1).correct([0, 1, 2], 0, 40) == first
    finally:
        for hook in hooks:
            hook.remove()


def test_recalibration_needs_two_values_per_channel():
    from pgnas_fast.nn.batchnorm import grouped_batchnorm

    net = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    with grouped_batchnorm(net, 2):
        with pytest.raises(ValueError, match="at least 2 values"):
            net(torch.randn(2, 3))  # one image per candidate: no variance to estimate
        net(torch.randn(4, 3))  # two per candidate: fine


# ---- pgnas-fast study ---------------------------------------------------------------------------
def test_kendall_tau_matches_scipy():
    from scipy.stats import kendalltau

    from pgnas_fast.search.study import kendall_tau

    gen = torch.Generator().manual_seed(4)
    for n in (40, 1300):  # 1300: across the blocks of rows it compares at a time
        xs = (torch.randint(0, 6, (n,), generator=gen) / 5).tolist()  # with ties
        ys = [x + 0.3 * v for x, v in zip(xs, torch.randn(n, generator=gen).tolist())]
        ys[:n // 3] = [round(y, 1) for y in ys[:n // 3]]  # and ties in both lists
        assert kendall_tau(xs, ys) == pytest.approx(kendalltau(xs, ys).statistic, abs=1e-12)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    for undefined in (([1.0], [2.0]), ([1, 1], [1, 2]), ([1, 2], [3, 3])):  # one item, either list all tied
        assert math.isnan(kendall_tau(*undefined))


def test_study_writes_report_and_figures(capsys, run_dir):
    import json

    from pgnas_fast.cli import main

    assert main(["study", str(run_dir), "--candidates", "40", "--tag", "t", "--quiet"]) == 0
    printed = capsys.readouterr().out
    out = run_dir / "study-t"
    result = json.loads((out / "study.json").read_text())
    race = result["racing"]
    assert (f"racing winner's exhaustive rank {race['winner_exhaustive_rank']}, "
            f"{race['exhaustive_images'] / race['images']:.1f}x fewer images") in printed
    assert f"report: {out / 'study.md'}" in printed
    for png in ("guided_vs_random.png", "best_vs_candidates.png", "racing_vs_exhaustive.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [c["candidates"] for c in result["best_vs_candidates"]] == [1, 2, 5, 10, 20, 40]
    bests = [c["best_heldout"] for c in result["best_vs_candidates"]]
    assert bests == sorted(bests)  # more candidates never choose worse on held-out
    assert 0 < result["random"]["mean"] <= 1 and 0 < result["guided"]["mean"] <= 1
    assert result["racing"]["winner_exhaustive_rank"] >= 1
    text = (out / "study.md").read_text()
    assert "Guided vs random" in text and "![guided vs random](guided_vs_random.png)" in text
    assert result["posterior"] == "concrete" and "(concrete posterior)" in text.splitlines()[0]
    assert result["checkpoint_epoch"] == result["epochs"] == 3 and "The weights of epoch 3 (of 3); every candidate scored on the 300 held-out" in text


def test_study_of_one_candidate_writes_strict_json(capsys, run_dir):
    """One candidate, one survivor: Kendall's tau is undefined, written as null (NaN is not JSON) and said in
    words."""
    import json

    from pgnas_fast.cli import main

    assert main(["study", str(run_dir), "--candidates", "1", "--tag", "one", "--quiet"]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} in study.json")

    result = json.loads((run_dir / "study-one" / "study.json").read_text(), parse_constant=refuse)
    assert result["racing"]["kendall_tau_survivors"] is result["racing"]["kendall_tau_first_round"] is None
    text = " ".join((run_dir / "study-one" / "study.md").read_text().split())
    assert "(the order racing's first cut acts on), undefined (fewer than two candidates" in text
    assert "of the 1 first-round survivor, undefined (fewer than two candidates" in text
    capsys.readouterr()
    assert main(["study", str(run_dir), "--candidates", "2", "--tag", "one", "--quiet"]) == 2  # (it holds one)
    assert capsys.readouterr().err == (f"pgnas-fast: error: {str(run_dir / 'study-one')!r} holds a study: "
                                       "--overwrite replaces it, or study under another --tag\n")
    assert main(["study", str(run_dir), "--candidates", "2", "--tag", "one", "--quiet", "--overwrite"]) == 0
    assert json.loads((run_dir / "study-one" / "study.json").read_text())["candidates"] == 2


# ---- selection rules and the sharded-resume paths, on a scorer that runs no model -----------------------
class FixedScorer(CandidateScorer):
    """Candidate c gets per_image(c) right per image; no model runs."""

    def __init__(self, size, per_image=lambda c: 1):
        from pgnas_fast.nn import GatedLinear

        super().__init__(GatedLinear(1, 1), torch.zeros(size, 1), torch.zeros(size, dtype=torch.long), seed=0)
        self.per_image = per_image

    def correct(self, candidates, start, end):
        return [self.per_image(c) * (end - start) for c in candidates]

    def kept_fractions(self, candidates, chunk=1024):
        return [0.5] * len(candidates)


RACING = {"strategy": "racing", "eta": 3, "first_share": 1 / 9, "progress": False}


def test_racing_ties_go_in_an_order_drawn_from_the_seed():
    """Candidates tied at a cut go on in the order of tie_order's draw (the RNG contract's RACING_TIES
    stream of the round, element: the candidate id), not by id; the draw depends on the seed and the
    round, and a tie of many spreads its survivors over the ids."""
    from pgnas_fast import ops
    from pgnas_fast.ops.streams import Domain, stream_id
    from pgnas_fast.search.rank import tie_order

    rows = rank(FixedScorer(90), range(9), **RACING)  # everyone ties in every round
    first = tie_order(0, 0, list(range(9)))
    assert first == dict(enumerate(ops.philox_uniform(9, seed=0, stream=stream_id(Domain.RACING_TIES, 0)).tolist()))
    kept = sorted(range(9), key=first.get)[:3]
    assert [r["id"] for r in rows if r["images"] >= 30] == sorted(kept)
    second = tie_order(0, 1, kept)
    assert [r["id"] for r in rows if r["images"] == 90] == [min(kept, key=second.get)]
    assert tie_order(0, 0, [5, 3]) == {5: first[5], 3: first[3]}  # (a candidate's draw is its own element)
    assert tie_order(1, 0, [3]) != {3: first[3]} and tie_order(0, 1, [3]) != {3: first[3]}
    # 1000 candidates tied: the 250 that go on are spread over the ids (by id they were 0 .. 249)
    rows = rank(FixedScorer(64), range(1000), strategy="racing", eta=4, first_share=1 / 16, progress=False)
    on = [r["id"] for r in rows if r["images"] > 4]
    assert len(on) == 250 and 0.3 < sum(c >= 500 for c in on) / 250 < 0.7


def test_best_candidate_takes_finalists_then_the_smaller_network():
    """Only candidates scored on the most images count (an early drop-out's score is on fewer); among
    equal scores the smaller kept fraction wins."""
    rows = [{"id": 0, "score": 0.9, "images": 34, "kept_fraction": 0.2},
            {"id": 1, "score": 0.8, "images": 300, "kept_fraction": 0.6},
            {"id": 2, "score": 0.8, "images": 300, "kept_fraction": 0.4},
            {"id": 3, "score": 0.7, "images": 300, "kept_fraction": 0.1}]
    assert best_candidate(rows)["id"] == 2


def test_progress_log_reads_every_ranks_file(tmp_path):
    ProgressLog(tmp_path, rank=0).append([{"round": 0, "id": 0, "correct": 1, "start": 0, "end": 5}])
    ProgressLog(tmp_path, rank=1).append([{"round": 0, "id": 1, "correct": 2, "start": 0, "end": 5}])
    assert set(ProgressLog(tmp_path, rank=0).load()) == {(0, 0), (0, 1)}


def test_progress_log_appends_after_a_cut_line_on_a_line_of_their_own(tmp_path):
    log = ProgressLog(tmp_path)
    log.append([{"round": 0, "id": 0, "correct": 1, "start": 0, "end": 5}])
    with open(log.path, "a") as f:
        f.write('{"correct": 3, "end": 5, "id": 1, "ro')  # killed mid-line
    log.append([{"round": 0, "id": 2, "correct": 2, "start": 0, "end": 5}])
    assert set(log.load()) == {(0, 0), (0, 2)}  # 1 is evaluated again; 2 is not lost


def test_ranks_agree_on_the_finished_rows_before_any_evaluates():
    """Each rank reads the logs when it starts; a rank that starts late also reads the rows another has
    appended since. The loaded rows go through the all-gather first, so that every rank splits the
    same todo list (else some candidates fall to no rank: 0 images, a division by zero)."""
    evaluated = []

    class Recording(FixedScorer):
        def correct(self, candidates, start, end):
            evaluated.extend(candidates)
            return super().correct(candidates, start, end)

    seen_by_another_rank = {"round": 0, "id": 5, "correct": 0, "start": 0, "end": 90}
    gathers = []

    def gather(rows):  # the first gather (of the loaded rows) brings the other rank's row
        gathers.append(rows)
        return rows + [seen_by_another_rank] if len(gathers) == 1 else rows

    rows = rank(Recording(90), range(8), gather=gather, progress=False)
    assert gathers[0] == [] and 5 not in evaluated and sorted(evaluated) == [0, 1, 2, 3, 4, 6, 7]
    assert [r["score"] for r in rows] == [1, 1, 1, 1, 1, 0, 1, 1]


def test_rows_restored_on_every_rank_count_once(tmp_path):
    """A sharded resume: every rank reads every rank's log, so the all-gather hands each restored row
    over once per rank; the ranking must count it once."""
    scorer = FixedScorer(90, per_image=lambda c: 0 if c % 2 else 1)
    expected = rank(scorer, range(12), log=ProgressLog(tmp_path), **RACING)
    assert rank(scorer, range(12), log=ProgressLog(tmp_path), gather=lambda rows: rows + rows, **RACING) == expected


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return supernets.create("digits-tiny", num_classes=10, p_init=0.2)


def test_kept_fraction_of_one_candidate_and_of_stacked_ones_agree(untrained):
    from pgnas_fast.nn import kept_fraction

    ids = [0, 3, 7]
    stacked = kept_fraction(stacked_candidate_masks(untrained, 2, ids))
    singles = [kept_fraction(candidate_masks(untrained, 2, i)) for i in ids]
    assert stacked == singles and len(set(singles)) > 1 and all(0 < f < 1 for f in singles)
    masks = candidate_masks(untrained, 2, 3)  # exact counts over every gated channel
    assert singles[1] == sum(m.sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert CandidateScorer(untrained, torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), seed=2
                           ).kept_fractions(ids, chunk=2) == singles


def test_scoring_leaves_the_model_in_full_mode(untrained):
    images, labels = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    CandidateScorer(untrained, images, labels, seed=1, batch_size=8).correct([0, 1, 2], 0, 20)
    assert all(layer.gate_mode == "full" and layer.gate_mask is None for _, layer in gated_layers(untrained))


def test_random_baseline_drops_at_the_learned_mean_rate(untrained):
    z = uniform_drop_logits(untrained)
    mean_p = mean_drop_probability(untrained)
    assert mean_p == pytest.approx(0.2)
    for name, layer in gated_layers(untrained):
        assert torch.sigmoid(z[name]).tolist() == pytest.approx([mean_p] * layer.gate_channels)


class RecordingBar:
    """tqdm's part that rank uses, recorded."""

    def __init__(self, total, initial=0, unit="it", **kwargs):
        self.total, self.n, self.initial, self.closed, self.unit = total, initial, initial, False, unit
        BARS.append(self)

    def update(self, k):
        assert k >= 0
        self.n += k

    def close(self):
        self.closed = True


BARS: list[RecordingBar] = []


def test_the_progress_bar_ends_full_under_racing_sharding_and_resume(monkeypatch, tmp_path):
    """The bar's total is every round's survivors (9 + 3 + 1 at eta 3), a rank's bar counts the other
    ranks' evaluations too, and rows restored from the logs start it (outside its rate), so every bar
    ends at its total."""
    from pgnas_fast.search import rank as rank_module

    monkeypatch.setattr(rank_module, "tqdm", RecordingBar)
    BARS.clear()
    rank(FixedScorer(90), range(9), log=ProgressLog(tmp_path), **{**RACING, "progress": True})
    assert (BARS[-1].total, BARS[-1].n, BARS[-1].initial, BARS[-1].closed) == (13, 13, 0, True)
    assert BARS[-1].unit == "cand-round"  # a candidate counts once per round it reaches
    rank(FixedScorer(90), range(9), log=ProgressLog(tmp_path), **{**RACING, "progress": True})  # all restored
    assert (BARS[-1].total, BARS[-1].n, BARS[-1].initial) == (13, 13, 13)

    def other_rank_too(rows):  # rank 1 of 2 scored the odd ids
        return rows + [{**row, "id": row["id"] + 1} for row in rows if row["id"] + 1 < 10]

    rank(FixedScorer(90), range(10), shard=(0, 2), gather=other_rank_too, progress=True)
    assert (BARS[-1].total, BARS[-1].n, BARS[-1].unit) == (10, 10, "cand")


def test_rank_refuses_a_candidate_id_given_twice(untrained):
    """Its rows would add up (a score of 2 x its accuracy); any iterable of ids is taken."""
    images, labels = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    scorer = CandidateScorer(untrained, images, labels, seed=1, batch_size=8)
    for strategy in ("exhaustive", "racing"):
        with pytest.raises(ValueError, match=r"distinct ids, got \[1\] more than once"):
            rank(scorer, [1, 2, 1], strategy=strategy, progress=False)
    assert rank(scorer, (c for c in (2, 0)), progress=False) == rank(scorer, [0, 2], progress=False)


def test_scorer_checks_images_and_labels_and_restores_the_training_mode(untrained):
    images, labels = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    with pytest.raises(ValueError, match="same number of held-out examples, at least one, got 20 and 19"):
        CandidateScorer(untrained, images, labels[:-1], seed=1)
    for kwargs, message in [(dict(images=images[:0], labels=labels[:0]), "at least one, got 0 and 0"),
                            (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
                            (dict(rows_per_pass=2.5), "rows_per_pass must be an int >= 1, got 2.5"),
                            (dict(model=torch.nn.Linear(2, 2)), "model has no gated layers"),
                            (dict(images=images.to("meta")), r"on the model's device \(cpu\), got meta and cpu")]:
        arguments = {"model": untrained, "images": images, "labels": labels, **kwargs}
        with pytest.raises(ValueError, match=message):
            CandidateScorer(arguments.pop("model"), arguments.pop("images"), arguments.pop("labels"), seed=1,
                            **arguments)
    for candidates, message in [([0, 1.9], r"candidate ids must be integers, got \[1.9\]"),
                                ([True], r"candidate ids must be integers, got \[True\]")]:
        with pytest.raises(ValueError, match=message):
            rank(CandidateScorer(untrained, images, labels, seed=1), candidates, progress=False)
    with pytest.raises(ValueError, match=r"p_logits has no entry for gated layers \['blocks"):
        CandidateScorer(untrained, images, labels, seed=1, p_logits={}).correct([0], 0, 20)
    for training in (True, False):
        untrained.train(training)
        CandidateScorer(untrained, images, labels, seed=1, batch_size=8).correct([0, 1], 0, 20)
        assert all(m.training == training for m in untrained.modules())


def test_scorer_gives_back_each_module_s_own_mode(untrained):
    """A model fine-tuned with a frozen (eval-mode) BatchNorm: scoring leaves it frozen."""
    images, labels = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    untrained.train()
    frozen = [m for m in untrained.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert frozen
    for m in frozen:
        m.eval()
    CandidateScorer(untrained, images, labels, seed=1, batch_size=8).correct([0, 1], 0, 20)
    assert untrained.training and not any(m.training for m in frozen)
    untrained.train()


# ---- nn/batchnorm.py --------------------------------------------------------------------------------
def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3, eps=0.3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.BatchNorm1d(4, eps=0.2))
    for bn in (net[1], net[5]):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
            bn.running_mean.uniform_(-1.0, 1.0)
            bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_recalibrated_statistics_are_those_of_a_torch_training_pass():
    """recalibrate_batchnorm keeps, in every BatchNorm (the later ones reading the earlier ones' new
    normalisation), the batch mean and unbiased variance a training-mode pass with momentum None keeps;
    the buffers stay plain tensors and the patch is gone. Mutants: biased variance kept, eps or the
    affine shift left out of the collect pass, the forward patch left in place, the pass run with
    autograd on."""
    import copy

    from pgnas_fast.nn.batchnorm import recalibrate_batchnorm

    net, images = _bn_net(), torch.randn(10, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(net)
    for bn in (reference[1], reference[5]):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        reference(images)
    recalibrate_batchnorm(net, images)
    for bn, ref in ((net[1], reference[1]), (net[5], reference[5])):
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
        assert not bn.running_mean.requires_grad and not bn.running_var.requires_grad
        assert bn.running_var.grad_fn is None
    assert all("forward" not in vars(m) for m in net.modules())
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(images), reference(images), rtol=1e-5, atol=1e-5)

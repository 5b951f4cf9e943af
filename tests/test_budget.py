"""The size budget (search/budget.py): a candidate's size is its exported network's, a budgeted search
or ranking ranks exactly the drawn candidates that fit, and a budget that nothing fits stops with the
smallest size drawn, before anything is written."""
import json

import pytest
import torch
import torch.nn as nn

from conftest import small_config
from pgnas_fast import configs
from pgnas_fast.nn import GatedConv2d, GatedLinear, candidate_masks
from pgnas_fast.search.budget import (Budget, BudgetError, candidate_size, candidate_sizes, pareto_front,
                                     within_budget)
from pgnas_fast.search.io import read_jsonl
from pgnas_fast.search.materialize import materialize
from pgnas_fast.search.run import load_run, run_search
from pgnas_fast.supernets.info import count_macs, count_parameters


def test_a_candidate_s_size_is_its_sliced_and_pruned_network_s():
    """conv(4 -> 6, 3x3) keeping inputs {0, 3}, ReLU, conv(6 -> 5, 1x1) keeping inputs {1, 2, 4}: the first
    conv's unread outputs go too, so it holds 3 x 2 x 9 weights; the 1x1 conv 5 x 3."""
    torch.manual_seed(0)
    net = nn.Sequential(GatedConv2d(4, 6, 3, padding=1), nn.ReLU(), GatedConv2d(6, 5, 1)).eval()
    masks = {"0": torch.tensor([1.0, 0.0, 0.0, 1.0]), "2": torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])}
    bias = [int(net[i].bias is not None) for i in (0, 2)]
    size = candidate_size(net, masks, (4, 7, 9))
    assert size == {"params": 3 * 2 * 9 + 3 * bias[0] + 5 * 3 + 5 * bias[1], "macs": 3 * 63 * 2 * 9 + 5 * 63 * 3}
    subnet = materialize(net, masks)
    assert size == {"params": count_parameters(subnet), "macs": count_macs(subnet, (4, 7, 9))}
    # every channel kept: the plain network's
    full = {name: torch.ones(layer.gate_channels) for name, layer in (("0", net[0]), ("2", net[2]))}
    assert candidate_size(net, full, (4, 7, 9))["params"] == sum(p.numel() for n, p in net.named_parameters()
                                                                 if "p_logit" not in n)


def test_a_linear_candidate_and_the_budget_s_arithmetic():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), GatedLinear(12, 7)).eval()
    mask = torch.zeros(12)
    mask[[0, 5, 6, 11, 3]] = 1
    size = candidate_size(net, {"1": mask}, (3, 2, 2))
    assert size == {"params": 7 * 5 + 7 * (net[1].bias is not None), "macs": 7 * 5}
    assert not Budget() and str(Budget()) == "no budget" and Budget().settings() == {"max_params": 0, "max_macs": 0}
    assert Budget().fits({"params": 10**12, "macs": 10**15})
    both = Budget(max_params=40, max_macs=35)
    assert both and both.settings() == {"max_params": 40, "max_macs": 35}
    assert str(both) == "at most 40 parameters and 35 MACs per image"
    assert both.fits({"params": 40, "macs": 35}) and not both.fits({"params": 41, "macs": 35})
    assert not both.fits({"params": 40, "macs": 36})
    assert Budget(max_macs=1_000_000).fits({"params": 10**9, "macs": 1_000_000})
    assert str(Budget(max_params=1_234_567)) == "at most 1,234,567 parameters"
    assert Budget.of({"max_params": 3, "max_macs": 0}) == Budget(3, 0)


def test_within_budget_keeps_the_fitting_ids_and_names_the_smallest_when_none_fits():
    sizes = {4: {"params": 90, "macs": 500}, 1: {"params": 70, "macs": 900}, 9: {"params": 100, "macs": 400}}
    assert within_budget(sizes, Budget(max_params=95)) == [1, 4]
    assert within_budget(sizes, Budget(max_params=95, max_macs=600)) == [4]
    with pytest.raises(BudgetError, match=r"none of the 3 drawn candidates fits the budget \(at most 60 parameters\): "
                                          r"every one has more than 60 parameters \(the smallest: 70; --max-params\); "
                                          r"raise a limit, or draw more candidates"):
        within_budget(sizes, Budget(max_params=60))
    with pytest.raises(BudgetError, match=r"\(at most 95 parameters and 450 MACs per image\): some fit each limit, "
                                          r"none both \(the smallest has 70 parameters, the cheapest 400 MACs"):
        within_budget(sizes, Budget(max_params=95, max_macs=450))
    with pytest.raises(BudgetError, match=r"\(at most 200 parameters and 300 MACs per image\): every one has more "
                                          r"than 300 MACs per image \(the smallest: 400; --max-macs\); raise"):
        within_budget(sizes, Budget(max_params=200, max_macs=300))
    assert str(Budget(1, 1)) == "at most 1 parameter and 1 MAC per image"


def test_config_keys_are_checked():
    assert configs.resolve("digits-tiny")["max_params"] == 0 == configs.resolve("digits-tiny")["max_macs"]
    with pytest.raises(configs.ConfigError, match="max_params"):
        configs.resolve("digits-tiny", {"max_params": -1})
    with pytest.raises(configs.ConfigError, match="max_macs"):
        configs.resolve("digits-tiny", {"max_macs": 1.5})


# the sizes of small_config(candidates=20), seed 3, span 28.6k-32.4k parameters and 646k-738k MACs: these
# keep some of the drawn candidates, not all
BUDGET = {"max_params": 31_000, "max_macs": 710_000}


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    out = tmp_path_factory.mktemp("budgeted")
    result = run_search(small_config(candidates=20, **BUDGET), seed=3, out_dir=out, progress=False)
    loaded = load_run(out)
    sizes = candidate_sizes(loaded.model, loaded.seed, range(20), configs.input_shape(loaded.config), progress=False)
    return out, result.summary, loaded, sizes


def test_a_budgeted_search_ranks_exactly_the_candidates_that_fit(budgeted):
    out, summary, loaded, sizes = budgeted
    budget = Budget(**BUDGET)
    fitting = [c for c in range(20) if budget.fits(sizes[c])]
    assert 0 < len(fitting) < 20
    rows = read_jsonl(out / "candidates.jsonl")
    assert [r["id"] for r in rows] == fitting
    assert all((r["params"], r["macs"]) == (sizes[r["id"]]["params"], sizes[r["id"]]["macs"]) for r in rows)
    arch = json.loads((out / "architecture.json").read_text())
    assert arch["candidate"] in fitting and (arch["params"], arch["macs"]) == tuple(sizes[arch["candidate"]].values())
    assert (summary["params_subnet"], summary["macs_subnet"]) == (arch["params"], arch["macs"])
    assert summary["budget"] == BUDGET and summary["candidates"] == len(fitting) and summary["drawn_candidates"] == 20
    # the random baseline is Table 3's, at the same drop rate, unbudgeted
    random_rows = read_jsonl(out / "random_candidates.jsonl")
    assert len(random_rows) == summary["random_candidates"] == 4 and "params" not in random_rows[0]
    report = (out / "report.md").read_text()
    assert (f"| size budget | at most 31,000 parameters and 710,000 MACs per image: {len(fitting)} of the 20 drawn "
            "candidates fit and were ranked; the random baseline is drawn without it") in report
    assert (f"with the last epoch's weights; first 20 candidates sized for the budget in "
            f"{summary['sizing_seconds']:.1f} s |") in report
    assert json.loads((out / "pareto.json").read_text()) == pareto_front(rows)
    assert summary["pareto"] == [r["id"] for r in pareto_front(rows)]


def test_sizing_sharded_equals_one_process(budgeted):
    _, _, loaded, sizes = budgeted
    shards = [candidate_sizes(loaded.model, loaded.seed, range(20), configs.input_shape(loaded.config),
                              shard=(r, 3), progress=False) for r in range(3)]
    assert sorted(shards[1]) == list(range(1, 20, 3))
    assert {c: s for shard in shards for c, s in shard.items()} == sizes
    gathered = candidate_sizes(loaded.model, loaded.seed, range(20), configs.input_shape(loaded.config),
                               shard=(1, 3), gather=lambda rows: rows + [{"id": 99, "params": 1, "macs": 2}],
                               progress=False)
    assert gathered[99] == {"params": 1, "macs": 2} and gathered[4] == sizes[4]


def test_sharded_sizing_covers_every_candidate_once_whatever_each_rank_saw_of_the_cache(budgeted, tmp_path):
    """torchrun's ranks read the shared cache at different moments, each while the others append to it:
    one rank may find sizes another does not yet. The shares must not depend on it (they did: candidates
    were lost from a torchrun search's table)."""
    from pgnas_fast.search.budget import SizeCache

    _, _, loaded, sizes = budgeted
    seen = SizeCache(tmp_path / "seen", "k")  # what rank 0 found: half of the sizes already there
    with seen.appender() as log:
        for c in range(0, 20, 2):
            log.write(json.dumps({"id": c, **sizes[c]}) + "\n")
    views = [seen, SizeCache(tmp_path / "empty", "k")]  # rank 1 read the cache before anything was in it
    shards = [candidate_sizes(loaded.model, loaded.seed, range(20), configs.input_shape(loaded.config),
                              shard=(r, 2), cache=views[r], progress=False) for r in range(2)]
    assert sorted(shards[0]) == list(range(0, 20, 2)) and sorted(shards[1]) == list(range(1, 20, 2))
    assert {c: s for shard in shards for c, s in shard.items()} == sizes


def _rank(capsys, run, *argv):
    from pgnas_fast.cli import main

    code = main(["rank", str(run), *map(str, argv), "--quiet"])
    return code, capsys.readouterr()


def test_rank_takes_the_run_s_budget_or_its_own(capsys, budgeted):
    out, summary, loaded, sizes = budgeted
    code, captured = _rank(capsys, out, "--tag", "as-run")
    assert code == 0, captured.err
    ranked = json.loads((out / "rank-as-run" / "summary.json").read_text())
    assert ranked["ranked_candidates"] == summary["candidates"] and ranked["max_params"] == 31_000
    assert ranked["best"]["id"] == summary["best_candidate"]
    assert (f"best candidate: {summary['best_candidate']}, the best of the {summary['candidates']} of the 20 drawn "
            "that fit the budget (at most 31,000 parameters and 710,000 MACs per image), held-out accuracy"
            ) in captured.out
    best = sizes[summary["best_candidate"]]
    assert f"  exported network: {best['params']:,} parameters, {best['macs']:,} MACs per image" in captured.out
    # --max-params 0 lifts the run's limit; the MACs limit stays
    code, captured = _rank(capsys, out, "--tag", "macs", "--max-params", 0, "--top", 50)
    assert code == 0, captured.err
    rows = read_jsonl(out / "rank-macs" / "candidates.jsonl")
    assert [r["id"] for r in rows] == [c for c in range(20) if sizes[c]["macs"] <= 710_000]
    assert all({"params": r["params"], "macs": r["macs"]} == sizes[r["id"]] for r in rows)
    top = json.loads((out / "rank-macs" / "top.json").read_text())
    assert len(top) == len(rows) and all((t["params"], t["macs"]) == tuple(sizes[t["candidate"]].values())
                                         for t in top)
    settings = json.loads((out / "rank-macs" / "settings.json").read_text())
    assert (settings["max_params"], settings["max_macs"]) == (0, 710_000)
    # a resume with another budget would mix rankings
    code, captured = _rank(capsys, out, "--tag", "macs", "--max-params", 0, "--max-macs", 700_000, "--resume")
    assert code == 2 and "max_macs 710000 (now 700000)" in captured.err
    # no budget at all: every candidate, and top.json still gives sizes
    code, captured = _rank(capsys, out, "--tag", "all", "--max-params", 0, "--max-macs", 0, "--top", 2)
    assert code == 0
    assert len(read_jsonl(out / "rank-all" / "candidates.jsonl")) == 20 and "drawn that fit" not in captured.out
    top = json.loads((out / "rank-all" / "top.json").read_text())
    assert [(t["params"], t["macs"]) for t in top] == [tuple(sizes[t["candidate"]].values()) for t in top]


def test_a_budget_nothing_fits_stops_before_anything_is_written(capsys, budgeted, tmp_path):
    out, *_ = budgeted
    code, captured = _rank(capsys, out, "--tag", "tiny", "--max-params", 1000)
    assert code == 2 and captured.err.count("\n") == 1
    assert "none of the 20 drawn candidates fits the budget (at most 1,000 parameters and 710,000 MACs" in captured.err
    assert not (out / "rank-tiny").exists()
    code, captured = _rank(capsys, out, "--tag", "tiny", "--max-params", 100)  # (before any candidate is sized)
    assert code == 2 and "no candidate can fit the budget (at most 100 parameters and 710,000 MACs" in captured.err
    # a budget that even the smallest network (every gated channel dropped: 704 parameters, 9,216 MACs) is
    # over is refused before training
    run = tmp_path / "run"
    with pytest.raises(BudgetError, match=r"no candidate can fit the budget \(at most 1,000 MACs per image\): with "
                                          r"every gated input channel dropped the network still has 704 parameters "
                                          r"and 9,216 MACs per image"):
        run_search(small_config(epochs=1, candidates=3, random_baseline=0, max_macs=1000), seed=0, out_dir=run,
                   progress=False)
    assert not (run / "checkpoint.pt").exists()
    # one that none of the drawn fits stops after training, keeps the checkpoint and says how to rank it
    with pytest.raises(BudgetError, match=rf"every one has more than 5,000 parameters .*The trained super-network is "
                                          rf"kept: `pgnas-fast rank {run} --max-params N --max-macs N`"):
        run_search(small_config(epochs=1, candidates=3, random_baseline=0, max_params=5000), seed=0, out_dir=run,
                   progress=False)
    assert (run / "checkpoint.pt").is_file() and not (run / "summary.json").exists()


def test_search_takes_the_budget_from_its_flags(capsys, tmp_path):
    from pgnas_fast.cli import main

    out = tmp_path / "run"
    argv = ["search", "--epochs", "1", "--candidates", "3", "--random-baseline", "2", "--max-params", "1000000000",
            "--max-macs", "999999999", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert ("the best of the 3 of the 3 drawn that fit the budget (at most 1,000,000,000 parameters and 999,999,999 "
            "MACs per image) (keeps") in captured.out
    # the two means are of other populations under a budget: said under them
    assert "(this run; cf. paper Table 3)\n    (guided: the 3 that fit the budget; random: 2 drawn without it)\n" in \
        captured.out
    assert ("note: the budget (at most 1,000,000,000 parameters and 999,999,999 MACs per image) excludes no "
            "candidate: the network with every channel kept has 35,322 parameters") in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget"] == {"max_params": 1_000_000_000, "max_macs": 999_999_999}
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["max_params"], config["max_macs"]) == (1_000_000_000, 999_999_999)
    assert all("params" in row for row in read_jsonl(out / "candidates.jsonl"))


def test_a_budgeted_racing_ranking_resumes_after_a_kill_with_the_same_table(capsys, budgeted, monkeypatch):
    """The candidates that fit are sized again on --resume (the same ids): the rounds logged before the kill
    are not scored again, and the table equals an uninterrupted ranking's."""
    from pgnas_fast.search import rank as rank_module

    out, *_ = budgeted
    argv = ["--candidates", 40, "--strategy", "racing", "--eta", 2, "--first-share", 0.25, "--max-params", 31_500]
    assert _rank(capsys, out, *argv, "--tag", "whole")[0] == 0
    whole = (out / "rank-whole" / "candidates.jsonl").read_bytes()
    real_correct, calls = rank_module.CandidateScorer.correct, []

    def killed_on_the_third_chunk(self, candidates, start, end):
        calls.append(len(candidates))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_correct(self, candidates, start, end)

    monkeypatch.setattr(rank_module.CandidateScorer, "correct", killed_on_the_third_chunk)
    code, captured = _rank(capsys, out, *argv, "--tag", "cut")
    assert code == 130 and "`pgnas-fast rank --resume` with the same arguments continues" in captured.err
    monkeypatch.setattr(rank_module.CandidateScorer, "correct", real_correct)
    code, captured = _rank(capsys, out, *argv, "--tag", "cut", "--resume")
    assert code == 0 and "candidate-rounds restored from before this --resume" in captured.out
    assert (out / "rank-cut" / "candidates.jsonl").read_bytes() == whole
    rows = read_jsonl(out / "rank-cut" / "candidates.jsonl")
    assert all(r["params"] <= 31_500 for r in rows) and 0 < len(rows) < 40


def test_the_pareto_front_keeps_the_finalists_nothing_dominates():
    def row(c, score, params, macs, images=300):
        return {"id": c, "score": score, "params": params, "macs": macs, "images": images}

    rows = [row(0, 0.90, 100, 1000), row(1, 0.95, 200, 1500), row(2, 0.90, 150, 900),  # 2: fewer MACs than 0
            row(3, 0.85, 300, 2000),  # dominated by 0, 1 and 2
            row(4, 0.95, 200, 1500),  # 1's twin: 1 stands for both
            row(5, 0.99, 500, 5000), row(6, 0.80, 90, 2000),  # 6: the smallest, least accurate
            row(7, 1.00, 10, 10, images=75),  # cut by racing: not a finalist
            row(8, 0.85, 100, 1000)]  # 0's size, less accurate: dominated by 0
    front = pareto_front(rows)
    assert [r["id"] for r in front] == [6, 0, 2, 1, 5]
    # brute force: nothing in the finalists dominates a front member, and every other finalist is dominated
    finalists = [r for r in rows if r["images"] == 300]

    def dominates(a, b):
        return (a["score"] >= b["score"] and a["params"] <= b["params"] and a["macs"] <= b["macs"]
                and (a["score"], a["params"], a["macs"]) != (b["score"], b["params"], b["macs"]))

    on_front = {r["id"] for r in front}
    assert all(not any(dominates(o, r) for o in finalists) for r in front)
    assert all(any(dominates(o, r) for o in finalists) or r["id"] == 4 for r in finalists if r["id"] not in on_front)


def test_rank_sizes_writes_every_candidate_s_size_and_the_front(capsys, budgeted):
    out, _, _, sizes = budgeted
    code, captured = _rank(capsys, out, "--candidates", 20, "--strategy", "exhaustive", "--max-params", 0,
                           "--max-macs", 0, "--sizes", "--tag", "sized")
    assert code == 0
    rows = read_jsonl(out / "rank-sized" / "candidates.jsonl")
    assert len(rows) == 20 and all({"params": r["params"], "macs": r["macs"]} == sizes[r["id"]] for r in rows)
    front = json.loads((out / "rank-sized" / "pareto.json").read_text())
    assert front == pareto_front(rows) and front
    summary = json.loads((out / "rank-sized" / "summary.json").read_text())
    assert summary["pareto"] == [r["id"] for r in front]
    assert "Pareto front (held-out accuracy against parameters and MACs, of the finalists): " in captured.out
    seconds = summary["sizing_seconds"], summary["seconds"]
    assert (f"  time: sizing 20 candidates {seconds[0]:.1f} s, ranking {seconds[1]:.1f} s ({20 / seconds[1]:.1f} "
            "candidates/s)") in captured.out
    # a resume that does not size leaves no front of the earlier run behind
    assert _rank(capsys, out, "--candidates", 20, "--strategy", "exhaustive", "--max-params", 0, "--max-macs", 0,
                 "--tag", "sized", "--resume")[0] == 0
    assert not (out / "rank-sized" / "pareto.json").exists()
    # unsized: no front
    assert _rank(capsys, out, "--candidates", 3, "--max-params", 0, "--max-macs", 0, "--tag", "plain")[0] == 0
    assert json.loads((out / "rank-plain" / "summary.json").read_text())["pareto"] is None
    assert not (out / "rank-plain" / "pareto.json").exists()


def test_a_boolean_budget_is_refused_in_json_spelling():
    with pytest.raises(configs.ConfigError, match=r"config key 'max_params' must be an int >= 0, got true$"):
        configs.resolve("digits-tiny", {"max_params": True})


def test_sizes_are_kept_for_every_later_ranking_and_survive_a_cut_line(capsys, budgeted, monkeypatch, tmp_path):
    """The search sized its drawn candidates into RUN_DIR/sizes/: a ranking of the same weights under
    another budget sizes none again; a kill mid-sizing keeps what was sized (a cut last line is skipped);
    another checkpoint or epoch is another cache; a fresh search removes it."""
    import shutil

    from pgnas_fast.search import budget as budget_module
    from pgnas_fast.search.budget import SizeCache, size_cache_key

    out, summary, loaded, sizes = budgeted
    run = tmp_path / "run"
    shutil.copytree(out, run)
    cache = SizeCache(run / "sizes", size_cache_key("last", 2, "cpu"))
    assert {c: cache.load()[c] for c in range(20)} == sizes  # the search's 20 (and what other tests' rankings added)
    shutil.rmtree(run / "sizes")
    sized = []
    real_size = budget_module.candidate_size

    def counting(model, masks, input_size):
        sized.append(1)
        return real_size(model, masks, input_size)

    monkeypatch.setattr(budget_module, "candidate_size", counting)
    assert _rank(capsys, run, "--candidates", 20, "--max-params", 30_000, "--tag", "first")[0] == 0
    assert len(sized) == 2 + 20  # (the reachability check sizes its two extreme networks)
    sized.clear()
    assert _rank(capsys, run, "--candidates", 20, "--max-params", 30_000, "--tag", "again")[0] == 0
    assert len(sized) == 2  # every size from the cache
    rows = read_jsonl(run / "rank-again" / "candidates.jsonl")
    assert all({"params": r["params"], "macs": r["macs"]} == sizes[r["id"]] for r in rows)
    # 25 candidates: the 5 new ones sized, appended to a log of this process's; a cut line is skipped
    assert _rank(capsys, run, "--candidates", 25, "--max-params", 30_000, "--tag", "more")[0] == 0
    assert len(sized) == 2 + 2 + 5 and sorted(cache.load()) == list(range(25))
    with open(next(iter((run / "sizes").glob("*.jsonl"))), "a") as log:
        log.write('{"id": 99, "params": 1')
    assert len(cache.load()) == 25
    # the best checkpoint's candidates are other draws: sized afresh, kept apart
    shutil.copy(run / "checkpoint.pt", run / "checkpoint-best.pt")
    sized.clear()
    assert _rank(capsys, run, "--candidates", 3, "--max-params", 10**6, "--checkpoint", "best", "--tag", "b")[0] == 0
    assert len(sized) == 2 + 3 and len(SizeCache(run / "sizes", size_cache_key("best", 2, "cpu")).load()) == 3
    # another epoch of a checkpoint (a search --resume trained it on) or another device type draws other
    # masks at their thresholds: other caches
    assert len({size_cache_key("last", 2, "cpu"), size_cache_key("last", 3, "cpu"), size_cache_key("last", 2, "cuda"),
                size_cache_key("best", 2, "cpu")}) == 4
    monkeypatch.undo()
    run_search(small_config(epochs=1, candidates=2, random_baseline=0), seed=0, out_dir=run, overwrite=True,
               progress=False)
    assert not (run / "sizes").exists()


def test_the_size_cache_skips_what_it_cannot_read_and_keeps_the_rest(tmp_path):
    """A damaged log or row (a disk error, a foreign file) costs its sizes only: they are sized again."""
    from pgnas_fast.search.budget import SizeCache

    cache = SizeCache(tmp_path, "last-epoch2-cpu")
    (tmp_path / "last-epoch2-cpu-1.jsonl").write_text(
        '{"id": 1, "params": 10, "macs": 20}\n'
        'not json\n'
        '{"id": 2, "params": 11}\n'  # no macs
        '{"id": "x", "params": 1, "macs": 1}\n'  # not an id
        '[3, 4]\n'  # not an object
        '{"id": 5, "params": 12, "macs": 22}\n'
        '{"id": 6, "par')  # cut by a kill
    (tmp_path / "last-epoch2-cpu-2.jsonl").write_bytes(b'\xff\xfe{"id": 7}\n')  # not text
    (tmp_path / "last-epoch2-cpu-3.jsonl").write_text('{"id": 8, "params": 13, "macs": 23}\n')
    (tmp_path / "best-epoch2-cpu-4.jsonl").write_text('{"id": 9, "params": 1, "macs": 1}\n')  # another key's
    assert cache.load() == {1: {"params": 10, "macs": 20}, 5: {"params": 12, "macs": 22},
                            8: {"params": 13, "macs": 23}}

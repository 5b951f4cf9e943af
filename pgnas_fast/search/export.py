"""The found architecture as data (`architecture.json`, design.md "Export") and as a network
(`export_candidate`: materialized, torch.export; `evaluate_export`)."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from ..nn import gated_layers, kept_fraction

FORMAT_VERSION = 1


def _layer_record(name: str, layer, mask: torch.Tensor) -> dict:
    record = {
        "name": name,
        "type": "linear" if isinstance(layer, nn.Linear) else "conv2d",
        "in_channels": layer.gate_channels,
        "out_channels": layer.weight.shape[0],
        "gate_groups": layer.gate_group_sizes,
        "p": layer.p.detach().tolist(),
        "kept_channels": torch.nonzero(mask).flatten().tolist(),
    }
    if record["type"] == "conv2d":
        record.update(kernel_size=list(layer.kernel_size), stride=list(layer.stride),
                      dilation=list(layer.dilation), groups=layer.groups)
    return record


def architecture_record(model: nn.Module, masks: Mapping[str, torch.Tensor], *, config: dict, seed: int,
                        candidate: dict, test_accuracy: float | None, size: Mapping[str, int]) -> dict:
    """Everything that names the found architecture; deterministic for a given (config, seed). `size`:
    {params, macs} of its exported network (budget.candidate_size)."""
    layers = [_layer_record(name, layer, masks[name]) for name, layer in gated_layers(model)]
    return {
        "format_version": FORMAT_VERSION,
        "preset": config["preset"],
        "seed": seed,
        "posterior": config["posterior"],  # the family whose learned p sampled the candidate
        "candidate": candidate["id"],
        "score": candidate["score"],
        "test_accuracy": test_accuracy,
        "kept_fraction": candidate["kept_fraction"],
        "params": size["params"],
        "macs": size["macs"],  # per image, of the convolutions and linear layers
        "layers": layers,
    }


def export_candidate(run_dir: str | Path, out: str | Path, *, candidate: int | None = None, rank_tag: str | None = None,
                     bn_recalibrate: int | None = None, checkpoint: str | None = None, device: str = "cpu",
                     data_dir=None) -> dict:
    """Materialize a candidate of a run into an export directory: subnet.pt, model.pt2 (torch.export),
    architecture.json, config.json, export.json (sizes before and after) and, when the run read a
    --data-dir, its data.json.

    The candidate: `candidate`, else the best of `pgnas-fast rank --tag rank_tag`, else the search's
    best. `bn_recalibrate` N > 0: the network keeps BatchNorm statistics recomputed for the candidate
    from N training images (as `rank --bn-recalibrate N` scored it); by default the ranking's own
    setting with `rank_tag`, else 0 (the super-network's running statistics). `checkpoint`: the weights
    (run.CHECKPOINTS, last or best); by default the ranking's with `rank_tag`, else the last."""
    from ..nn import candidate_masks, set_gates
    from ..nn.batchnorm import recalibrate_batchnorm
    from .feed import checked_recalibration_images
    from .io import data_dir_of
    from .rank import accuracy
    from .run import load_run

    run_dir = Path(run_dir)
    choice = choose_candidate(run_dir, candidate=candidate, rank_tag=rank_tag, checkpoint=checkpoint)
    ranked = choice.ranked
    if ranked is not None and bn_recalibrate is not None and bn_recalibrate != ranked.bn_recalibrate:
        print(f"note: --rank {rank_tag} scored its candidates with --bn-recalibrate {ranked.bn_recalibrate}, this "
              f"export uses {bn_recalibrate}: its held-out accuracy is not the ranking's score", file=sys.stderr)
    if bn_recalibrate is None:
        bn_recalibrate = ranked.bn_recalibrate if ranked is not None else 0
    data_dir = data_dir_of(run_dir, data_dir)
    loaded = load_run(run_dir, device=device, data_dir=data_dir, checkpoint=choice.checkpoint)
    candidate = chosen_id(run_dir, choice, loaded)
    recalibration = checked_recalibration_images(loaded.feed, bn_recalibrate) if bn_recalibrate else None
    model, feed = loaded.model, loaded.feed
    masks = candidate_masks(model, loaded.seed, candidate)
    set_gates(model, "hard", masks=masks)
    if recalibration is not None:
        recalibrate_batchnorm(model.eval(), recalibration)
    heldout, test = accuracy(model, feed.eval_batches("heldout")), accuracy(model, feed.eval_batches("test"))
    return write_network(out, model, masks, config=loaded.config, seed=loaded.seed, feed=feed, candidate=candidate,
                         heldout=heldout, test=test, data_dir=data_dir, data_fingerprint=loaded.data_fingerprint,
                         about={"rank_tag": rank_tag, "bn_recalibrate": bn_recalibrate,
                                # the weights' epoch: a run still training (or killed) exports the last finished one
                                "checkpoint": choice.checkpoint, "checkpoint_epoch": loaded.epoch,
                                "epochs": loaded.config["epochs"]})


def write_network(out: str | Path, model: nn.Module, masks: Mapping[str, torch.Tensor], *, config: dict, seed: int,
                  feed, candidate: int, heldout: float, test: float, data_dir, data_fingerprint: str | None,
                  about: dict) -> dict:
    """Write candidate `candidate` of `model` (its `masks`; `heldout` and `test` its accuracies) into the
    export directory `out` (materialize.py's docstring lists the files); export.json holds its sizes,
    accuracies and `about` (where the weights came from). Returns export.json's content. Leaves the
    model's gates full."""
    from .. import configs
    from ..nn import set_gates
    from ..supernets.info import describe
    from .io import DATA_FILE, write_data_record, write_json
    from .materialize import materialize, materialize_all_channels

    out = Path(out)
    set_gates(model, "full")
    subnet = materialize(model, masks)
    input_size = configs.input_shape(config)
    supernet, all_channels, after = (describe(net, input_size)
                                     for net in (model, materialize_all_channels(model), subnet))
    record = architecture_record(model, masks, config=config, seed=seed,
                                 candidate={"id": candidate, "score": heldout, "kept_fraction": kept_fraction(masks)},
                                 test_accuracy=test, size={"params": after["params"], "macs": after["macs"]})
    out.mkdir(parents=True, exist_ok=True)
    example = next(iter(feed.eval_batches("test")))[0][:2]
    torch.save(subnet, out / "subnet.pt")
    # torch.export (TorchScript is deprecated): batch size dynamic, loads with plain torch
    program = torch.export.export(subnet, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, out / "model.pt2")
    write_json(out / "architecture.json", record)
    write_json(out / "config.json", {"config": config, "seed": seed})
    if data_dir is not None:  # evaluate's default, as the run's is rank's
        write_data_record(out, data_dir, data_fingerprint)
    else:  # (an export of another run into this directory left its own)
        (out / DATA_FILE).unlink(missing_ok=True)
    # sizes of the super-network (drop logits and training-only heads included), of the same network
    # materialized with every channel kept (what the candidate's sizes compare with) and of the candidate
    summary = {"candidate": candidate, "posterior": config["posterior"], "heldout_accuracy": heldout,
               "test_accuracy": test,
               "params_supernet": supernet["params"], "params_all_channels": all_channels["params"],
               "params_subnet": after["params"], "macs_supernet": supernet["macs"],
               "macs_all_channels": all_channels["macs"], "macs_subnet": after["macs"],
               "input_size": list(input_size), "inputs": feed.inputs, "classes": feed.classes, **about}
    write_json(out / "export.json", summary)
    return summary


class Choice(NamedTuple):
    """Which candidate of a run, with which weights, a reader takes (choose_candidate)."""
    candidate: int | None  # None: the search's best (architecture.json; chosen_id reads it)
    checkpoint: str  # run.CHECKPOINTS
    ranked: RankedBest | None  # the `pgnas-fast rank` whose best it is


def choose_candidate(run_dir: Path, *, candidate: int | None, rank_tag: str | None, checkpoint: str | None) -> Choice:
    """`candidate` (with `checkpoint`, by default the last), else the best of `pgnas-fast rank --tag
    rank_tag` (with its checkpoint), else the search's best (of the last checkpoint: an id names a
    draw from one checkpoint's drop probabilities). Checked before the run loads."""
    from .run import CHECKPOINTS, RunError

    ranked = None
    if rank_tag is not None:
        if candidate is not None:
            raise RunError("pass --candidate or --rank, not both")
        ranked = _ranked_best(run_dir, rank_tag)
        if checkpoint is not None and checkpoint != ranked.checkpoint:  # (its scores are of the other weights)
            raise RunError(f"the ranking under --rank {rank_tag} read {CHECKPOINTS[ranked.checkpoint]}, not the "
                           f"{CHECKPOINTS[checkpoint]} that --checkpoint {checkpoint} asks for: leave --checkpoint out "
                           "(the ranking's is taken), or pass --candidate")
        candidate, checkpoint = ranked.candidate, ranked.checkpoint
    checkpoint = checkpoint or "last"
    if candidate is None and checkpoint != "last":
        raise RunError(f"the search chose its candidate (architecture.json) among draws from {CHECKPOINTS['last']}; "
                       f"the same id drawn from {CHECKPOINTS[checkpoint]} is another network: rank that checkpoint "
                       f"(pgnas-fast rank {run_dir} --checkpoint {checkpoint} --tag TAG) and pass --rank TAG, "
                       "or pass --candidate")
    return Choice(candidate, checkpoint, ranked)


def chosen_id(run_dir: Path, choice: Choice, loaded) -> int:
    """The id of `choice` once its run is `loaded` (run.LoadedRun): a ranking must be of the loaded
    checkpoint's epoch; the search's best is read from architecture.json."""
    from ..ops.streams import MAJOR_LIMIT
    from .run import RunError

    config, candidate, ranked = loaded.config, choice.candidate, choice.ranked
    if ranked is not None and ranked.epoch is not None and ranked.epoch != loaded.epoch:
        # (`search --resume` trains a checkpointed run on and keeps its rank-* directories)
        raise RunError(f"--rank {ranked.tag} ranked the checkpoint of epoch {ranked.epoch}, but the run has trained on "
                       f"since (epoch {loaded.epoch}): its best candidate and scores are of other weights; rank "
                       f"again ({ranked.again})")
    if ranked is None and candidate is not None and candidate >= config["candidates"]:
        print(f"note: candidate {candidate} is past the {config['candidates']} the search ranked (ids 0 .. "
              f"{config['candidates'] - 1}): a draw of the same posterior that no ranking has scored", file=sys.stderr)
    architecture_path = run_dir / "architecture.json"
    if candidate is None:
        if not architecture_path.is_file():
            raise RunError(f"{str(run_dir)!r} has no architecture.json (the search did not finish): pass --candidate")
        try:
            candidate = json.loads(architecture_path.read_text())["candidate"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise RunError(f"{str(architecture_path)!r} is malformed ({type(err).__name__}: {err}): pass --candidate"
                           ) from None
        if isinstance(candidate, bool) or not isinstance(candidate, int) or not 0 <= candidate < MAJOR_LIMIT:
            raise RunError(f"{str(architecture_path)!r} names candidate {candidate!r}, not an id in [0, 2^40): "
                           "pass --candidate")
    if not 0 <= candidate < MAJOR_LIMIT:
        raise RunError(f"--candidate must be an id in [0, 2^40), got {candidate}")
    return candidate


class RankedBest(NamedTuple):
    """What export and train take from a `pgnas-fast rank` (its summary.json)."""
    candidate: int  # the best
    bn_recalibrate: int
    checkpoint: str  # which weights it ranked (run.CHECKPOINTS)
    epoch: int | None  # their epoch (None: a ranking older than that key)
    again: str  # the command that ranks the same again
    tag: str


def _ranked_best(run_dir: Path, tag: str) -> RankedBest:
    """The best candidate of `pgnas-fast rank RUN_DIR --tag TAG`, and how it was ranked."""
    from .io import SEARCH_RANKINGS
    from .run import CHECKPOINTS, RunError

    if f"rank-{tag}" in SEARCH_RANKINGS.values():
        raise RunError(f"--rank {tag}: rank-{tag}/ holds the search's own ranking log, not a `pgnas-fast rank`; the "
                       "search's best candidate is the run's architecture.json, taken without --rank")
    path = run_dir / f"rank-{tag}" / "summary.json"
    if not path.is_file():
        raise RunError(f"{str(path)!r} does not exist: --rank {tag} names no finished ranking of this run "
                       f"(pgnas-fast rank {run_dir} --tag {tag}, or --resume an interrupted one)")
    try:
        summary = json.loads(path.read_text())
        best, recalibration = summary["best"]["id"], summary["bn_recalibrate"]
        epoch, checkpoint = summary.get("checkpoint_epoch"), summary.get("checkpoint", "last")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise RunError(f"{str(path)!r} is malformed ({type(err).__name__}: {err})") from None
    if not all(type(v) is int and v >= 0 for v in (best, recalibration)):
        raise RunError(f"{str(path)!r} is malformed: best id {best!r} and bn_recalibrate {recalibration!r} must be "
                       "ints >= 0")
    if checkpoint not in CHECKPOINTS:
        raise RunError(f"{str(path)!r} is malformed: checkpoint {checkpoint!r} must be one of {', '.join(CHECKPOINTS)}")
    again = [f"pgnas-fast rank {run_dir} --tag {tag}"]
    for option, key in (("--candidates", "candidates"), ("--strategy", "strategy"), ("--eta", "eta"),
                        ("--first-share", "first_share")):
        if summary.get(key) is not None:
            again.append(f"{option} {summary[key]}")
    try:  # the budget where it is not the one `rank` takes by default, the run's
        run_config = json.loads((run_dir / "config.json").read_text())["config"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        run_config = {}
    for option, key in (("--max-params", "max_params"), ("--max-macs", "max_macs")):
        if summary.get(key, 0) != run_config.get(key, 0):
            again.append(f"{option} {summary.get(key, 0)}")
    if recalibration:
        again.append(f"--bn-recalibrate {recalibration}")
    if checkpoint != "last":
        again.append(f"--checkpoint {checkpoint}")
    return RankedBest(best, recalibration, checkpoint, epoch, " ".join(again), tag)


def evaluate_export(directory: str | Path, *, split: str = "test", device: str = "cpu", data_dir=None,
                    standalone: bool = True) -> float:
    """Accuracy of an exported network on a split of its run's data (the torch.export artefact by
    default, else subnet.pt)."""
    from .materialize import load_subnet
    from .io import data_dir_of
    from .run import RunError, build_feed, load_recorded_data

    directory = Path(directory)
    for name in ("config.json", "model.pt2" if standalone else "subnet.pt"):
        if not (directory / name).is_file():
            raise RunError(f"{str(directory)!r} is not an export directory: {name} is missing (pgnas-fast export)")
    try:
        run_config = json.loads((directory / "config.json").read_text())
        config, seed = run_config["config"], run_config["seed"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RunError(f"{str(directory / 'config.json')!r} is malformed: {err}") from None
    data, _ = load_recorded_data(directory, config, data_dir_of(directory, data_dir))
    feed = build_feed(config, data, torch.device(device), seed=seed)
    if not standalone:
        net = load_subnet(directory, map_location=device).eval()
    else:
        try:
            with _quiet_logger("torch.export"):  # (it logs the error below as a traceback first)
                net = torch.export.load(directory / "model.pt2").module().to(device)  # exported in eval mode already
        except Exception as err:  # a cut or foreign file fails inside torch.export in many ways (zip, pickle, schema)
            raise RunError(f"{str(directory / 'model.pt2')!r} is not a readable torch.export program "
                           f"({type(err).__name__}: {err})") from None
    exported_input = _exported_input_size(directory)
    correct = seen = 0
    with torch.no_grad():
        for images, labels in feed.eval_batches(split):
            if exported_input is not None and list(images.shape[1:]) != exported_input:
                raise RunError(f"the network in {str(directory)!r} takes images of {exported_input} (export.json), "
                               f"its config.json's data set gives {list(images.shape[1:])}: the export directory "
                               "mixes files of different exports; export again")
            logits = net(images)
            if logits.shape[1] != feed.num_classes:  # another data set's directory: its scores would mean nothing
                raise RunError(f"the data has {feed.num_classes} classes, the exported network predicts "
                               f"{logits.shape[1]}: is --data-dir the data set the run searched on?")
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    return correct / seen


def _exported_input_size(directory: Path) -> list[int] | None:
    """The [C, H, W] an export's network takes (export.json's input_size); None if export.json is absent
    or has no such list."""
    try:
        size = json.loads((directory / "export.json").read_text())["input_size"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None
    return size if isinstance(size, list) and all(type(n) is int for n in size) else None


@contextlib.contextmanager
def _quiet_logger(name: str):
    """The logger `name` at ERROR level inside the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

"""Named presets (design.md layer 1): one readable mapping each, validated by one schema.

A run's resolved config is its preset updated by the user's overrides (`--config FILE.json` and the
CLI flags); `resolve` checks every key's type and range and names the offending key on error. A preset
tuned for one posterior family may name other values for the other family (FAMILY_SETTINGS); they
apply between the preset and the user's overrides.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
from collections.abc import Mapping
from pathlib import Path

from ..data.digits import TEST_SIZE as DIGITS_TEST_SIZE
from ..nn.gated import LOG_ALPHA_LIMIT, POSTERIORS
from ..ops.streams import MAJOR_LIMIT

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")


class ConfigError(ValueError):
    """A malformed preset override or config file; the message names the key."""


# Shared by every preset unless it says otherwise (pgnas-method.md section 2 conventions).
DEFAULTS: dict = {
    "data_args": {},
    "heldout_size": 5000,  # carved from the training set, stratified; ranks the candidates
    "split_seed": 0,  # fixed, so that every search seed sees the same splits
    "supernet_args": {},
    "posterior": "concrete",  # concrete (concrete dropout) | gaussian (Gaussian variational dropout)
    # the regulariser (either family's KL term) ramps linearly from 0 to full weight, per step, over
    # these first epochs; 0: full weight from the start
    "kl_warmup_epochs": 0,
    "p_init": 0.1,  # gaussian: log alpha = logit(p_init)
    "tau": 0.2,
    "lr_min": 0.0,
    "schedule": "cosine",  # cosine (per step, to lr_min) | step (x gamma at milestones) | sgdr (warm restarts)
    "milestones": [],
    "gamma": 0.1,
    "sgdr_t0": 10,
    "sgdr_tmul": 2,
    "p_lr_scale": 1.0,  # step-size multiplier of the drop logits (the authors: 1)
    "momentum": 0.9,  # Nesterov SGD; no weight decay: the regulariser replaces it
    "grad_clip": 0.0,  # global gradient-norm clip; 0 disables
    "drop_reg": 1.0,
    "n_train": 0,  # N of the regulariser; 0 means the training split's size
    "aux_weight": 0.0,  # auxiliary-head loss weight (ENAS cells)
    "amp": "none",  # none | bf16 (autocast on CUDA only)
    "channels_last": False,  # training inputs, and every evaluation (search.run.evaluation_layout)
    "random_baseline": 0,  # random-gate candidates at the guided ones' expected drop rate (paper Table 3)
    "ranking": "racing",  # racing (paired successive halving) | exhaustive
    # racing keeps the best 1/eta each round, on eta times more images, from a first share of the
    # held-out set; 4 and 1/16 kept the exhaustive winner's score in the top 2 on 5 of 5 digits seeds
    # at 1000 candidates while reading 6.4x fewer images (3 and 1/27: 4 of 5, 8.7x fewer; the same with
    # ties at a cut in a drawn order, rank.tie_order, as with ties by id)
    "racing_eta": 4,
    "racing_first_share": 1 / 16,
    # a size budget on the candidates (search/budget.py): only those whose exported network has at most
    # these parameters / MACs per image are ranked; 0: no limit
    "max_params": 0,
    "max_macs": 0,
    "rank_rows": 8192,  # rows (candidates x images) per batched evaluation pass
    "eval_batch_size": 500,
    "workers": 8,  # DataLoader workers: ImageNet; CIFAR on the CPU (there at most one per available core)
    # CIFAR training batches: "tensors" (the set resident on the device, batched augmentation there),
    # "loader" (DataLoader workers augmenting image by image), "auto" (tensors on CUDA, loader on CPU)
    "cifar_pipeline": "auto",
    # CIFAR: AutoAugment's CIFAR policy before the paper's crop, flip and cutout, as the authors'
    # Shake-Shake code ran it (data/autoaugment.py); the paper states only crop, flip and cutout
    "autoaugment": False,
    "sync_bn": False,  # data parallel on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)
    "threads": 0,  # torch intra-op threads; 0 = torch's default
}

_CIFAR_SHAKE = {  # SupNet-M / MI protocol: Shake-Shake-26 2x(16k)d
    "input_size": 32,
    "epochs": 1800,
    "batch_size": 128,
    "lr": 0.01,
    "schedule": "cosine",
    "grad_clip": 5.0,
    "n_train": 5e5,  # "about ten times the real size because of augmentation"
    "candidates": 1500,
}
_CIFAR_ENAS = {  # SupNet-E / EI protocol: the fixed ENAS micro cell
    "input_size": 32,
    "epochs": 630,  # 10 + 20 + 40 + 80 + 160 + 320: six SGDR cycles end exactly here
    "batch_size": 128,  # not stated in the paper; our choice
    "lr": 0.05,
    "lr_min": 1e-4,
    "schedule": "sgdr",
    "sgdr_t0": 10,
    "sgdr_tmul": 2,
    "grad_clip": 5.0,
    "weight_reg": 0.1,
    "n_train": 5e5,
    "aux_weight": 0.4,
    # drop-path: ENAS's child_drop_path_keep_prob 0.6 is a keep probability, ramped over training
    "supernet_args": {"drop_path_keep_prob": 0.6},
    "candidates": 1500,
}
_IMAGENET = {  # SupNet-D-121 protocol; R-50 follows it (its own recipe is not published)
    "dataset": "imagenet",
    "heldout_size": 10000,  # 10 images per class
    "input_size": 224,
    "epochs": 180,
    "batch_size": 300,
    "lr": 0.1,
    "schedule": "step",
    "milestones": [90, 150],
    "gamma": 0.1,
    "n_train": 1281167.0,
    "candidates": 1500,
    "channels_last": True,
    "amp": "bf16",
}

PRESETS: dict[str, dict] = {
    # The embedded default: real data shipped with scikit-learn, a search in about 15 s on 2 cores.
    "digits-tiny": {
        "dataset": "digits",
        "data_args": {"test_size": DIGITS_TEST_SIZE},
        "heldout_size": 300,
        "supernet": "digits-tiny",
        "supernet_args": {"width": 16, "gate_group_size": 4},
        "input_size": 8,
        "epochs": 30,
        "batch_size": 64,
        "lr": 0.05,
        # The authors train 1800 epochs; in 30, the drop logits need a larger step for the posterior
        # to move: p then spreads from 0.1 and about a fifth of the channels go.
        "p_lr_scale": 30.0,
        "grad_clip": 5.0,
        "weight_reg": 10.0,  # l^2, the length-scale squared
        "candidates": 200,
        "random_baseline": 200,
        "ranking": "exhaustive",  # cheap here, and the Table 3 comparison wants every candidate's full score
        "rank_rows": 1200,  # on one CPU thread larger passes fall out of cache
        "eval_batch_size": 1024,
        # ranking and accuracies channels_last (the convolutions 1.7x faster on oneDNN, the whole pass
        # 0-6%: benchmarks/results/cpu-2core.md); training is unchanged, its
        # 1-channel input is both layouts and its weights stay contiguous
        "channels_last": True,
        # Tensors this small gain nothing from a second thread, and OpenMP spin-waits make 2 threads
        # ~40x slower when another process wants a core.
        "threads": 1,
    },
    "cifar10-supnet-m": {**_CIFAR_SHAKE, "dataset": "cifar10", "supernet": "supnet-m", "weight_reg": 50.0},
    "cifar10-supnet-mi": {**_CIFAR_SHAKE, "dataset": "cifar10", "supernet": "supnet-mi", "weight_reg": 150.0},
    "cifar100-supnet-mi": {**_CIFAR_SHAKE, "dataset": "cifar100", "supernet": "supnet-mi", "weight_reg": 2500.0,
                           "candidates": 5000},
    "cifar10-supnet-e": {**_CIFAR_ENAS, "dataset": "cifar10", "supernet": "supnet-e"},
    "cifar10-supnet-ei": {**_CIFAR_ENAS, "dataset": "cifar10", "supernet": "supnet-ei"},
    "imagenet-d121": {**_IMAGENET, "supernet": "supnet-d121", "weight_reg": 100.0},
    "imagenet-r50": {**_IMAGENET, "supernet": "supnet-r50", "weight_reg": 80.0},
}

# preset -> family -> settings that replace the preset's for that family (the presets are tuned for
# the concrete family).
FAMILY_SETTINGS: dict[str, dict[str, dict]] = {
    "digits-tiny": {
        # The Gaussian KL counts every gated weight, 31 per training image here (34,880 / 1,137): with
        # N the real 1,137 it is 51 nats per image at p_init against a cross-entropy of 2.3, and it
        # drops most channels (mean guided candidate 17-20 % held-out even at N = 10 x 1,137). We
        # temper it (KL / 300; the CIFAR presets' N is likewise 10x their data) to the strength at
        # which the family keeps about the share of channels the concrete preset keeps (~80 %), so
        # that the two families compare at equal size; the warm-up lets the weights learn before the
        # KL pulls alpha up (GAUSSIAN_KL_WARMUP). Measured: benchmarks/README.md, "Posterior families on digits".
        "gaussian": {"n_train": 300 * 1137.0},
    },
    # The paper presets with the Gaussian family: N is set so that the KL at p_init weighs, per training
    # image, the share of the initial cross-entropy (ln classes) that digits' tuned N gives it (0.074;
    # tests/test_presets.py checks it); the warm-up is digits' share of training. Their concrete N
    # (5e5 on CIFAR, 1.28e6 on ImageNet) would make the KL 9-241 nats per image against a cross-entropy of
    # 2.3-6.9 and drive every channel towards p = 1 in the first epochs. A starting point, not validated by a
    # full search.
    **{preset: {"gaussian": {"n_train": n}}
       for preset, n in {"cifar10-supnet-e": 3.4e7, "cifar10-supnet-ei": 1.4e8, "cifar10-supnet-m": 2.6e8,
                         "cifar10-supnet-mi": 7.1e8, "cifar100-supnet-mi": 3.6e8, "imagenet-d121": 2.2e7,
                         "imagenet-r50": 4.5e7}.items()},
}

# The Gaussian family's KL warm-up, as a share of training: kl_warmup_epochs = epochs x this, from the
# epochs after the overrides (tuned on digits: 5 of 30 epochs), unless kl_warmup_epochs is set itself.
GAUSSIAN_KL_WARMUP = 1 / 6

# key -> (python types, predicate, what the predicate demands)
_POSITIVE_INT = ((int,), lambda v: v > 0, "an int > 0")
_NON_NEGATIVE_INT = ((int,), lambda v: v >= 0, "an int >= 0")
_POSITIVE = ((int, float), lambda v: math.isfinite(v) and v > 0, "a number > 0")
_NON_NEGATIVE = ((int, float), lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
# the random splits' seed goes to numpy (RandomState takes 32 bits)
_SPLIT_SEED = ((int,), lambda v: 0 <= v < 1 << 32, "an int in [0, 2^32)")


def _crop_scale(value: list) -> bool:
    return (len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            and 0 < value[0] <= value[1] <= 1)


# dataset -> the keys its `data_args` take (key -> schema entry); ImageFolder trees (imagenet): the
# training crops' share of the image's area and the flips (data.imagenet.CROP_SCALE and flips by default:
# ImageNet's)
DATA_ARGS = {"digits": {"test_size": _POSITIVE_INT},
             "imagenet": {"crop_scale": ((list,), _crop_scale, "a list [min, max] of area shares, 0 < min <= max <= 1"),
                          "flip": ((bool,), lambda v: True, "true or false")}}
# dataset -> the size of its images (ImageNet: any crop size)
NATIVE_INPUT_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32}
IMAGE_CHANNELS = {"digits": 1, "cifar10": 3, "cifar100": 3, "imagenet": 3}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000}  # ImageNet: the full set's
RANKING_STRATEGIES = ("racing", "exhaustive")  # the `ranking` key's values (search.rank.rank)

SCHEMA = {
    "dataset": ((str,), lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    "data_args": ((dict,), lambda v: True, "an object"),
    "heldout_size": _POSITIVE_INT,
    "split_seed": _SPLIT_SEED,
    "supernet": ((str,), lambda v: bool(v), "a super-network name"),
    "supernet_args": ((dict,), lambda v: True, "an object"),
    "input_size": _POSITIVE_INT,
    "posterior": ((str,), lambda v: v in POSTERIORS, f"one of {', '.join(POSTERIORS)}"),
    "kl_warmup_epochs": _NON_NEGATIVE,
    "p_init": ((int, float), lambda v: 0 < v < 1, "a number in (0, 1)"),
    "tau": _POSITIVE,
    "epochs": _POSITIVE_INT,
    "batch_size": _POSITIVE_INT,
    "lr": _POSITIVE,
    "lr_min": _NON_NEGATIVE,
    "schedule": ((str,), lambda v: v in ("cosine", "step", "sgdr"), "one of cosine, step, sgdr"),
    "milestones": ((list,), lambda v: all(type(m) is int and m > 0 for m in v) and v == sorted(v),
                   "an ascending list of epochs > 0"),
    "gamma": _POSITIVE,
    "sgdr_t0": _POSITIVE_INT,
    "sgdr_tmul": _POSITIVE_INT,
    "p_lr_scale": _POSITIVE,
    "momentum": ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "grad_clip": _NON_NEGATIVE,
    "weight_reg": _NON_NEGATIVE,
    "drop_reg": _NON_NEGATIVE,
    "n_train": _NON_NEGATIVE,
    "aux_weight": _NON_NEGATIVE,
    "amp": ((str,), lambda v: v in ("none", "bf16"), "none or bf16"),
    "channels_last": ((bool,), lambda v: True, "true or false"),
    # candidate ids are stream majors: below 2^40
    "candidates": ((int,), lambda v: 0 < v <= MAJOR_LIMIT, "an int in [1, 2^40]"),
    "random_baseline": ((int,), lambda v: 0 <= v <= MAJOR_LIMIT, "an int in [0, 2^40]"),
    "ranking": ((str,), lambda v: v in RANKING_STRATEGIES, " or ".join(RANKING_STRATEGIES)),
    "racing_eta": ((int,), lambda v: v >= 2, "an int >= 2"),
    "racing_first_share": ((int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "max_params": _NON_NEGATIVE_INT,
    "max_macs": _NON_NEGATIVE_INT,
    "rank_rows": _POSITIVE_INT,
    "eval_batch_size": _POSITIVE_INT,
    "workers": _NON_NEGATIVE_INT,
    "threads": _NON_NEGATIVE_INT,
    "sync_bn": ((bool,), lambda v: True, "true or false"),
    "cifar_pipeline": ((str,), lambda v: v in ("auto", "tensors", "loader"), "one of auto, tensors, loader"),
    "autoaugment": ((bool,), lambda v: True, "true or false"),
}


def input_shape(config: Mapping) -> tuple[int, int, int]:
    """[C, H, W] of one model input of a resolved config."""
    return IMAGE_CHANNELS[config["dataset"]], config["input_size"], config["input_size"]


def names() -> list[str]:
    return sorted(PRESETS)


def load_overrides(path: str | Path, preset: str | None = None) -> dict:
    """Overrides from a JSON file: an object of preset keys, or a run's config.json ({"config": its
    resolved config, "seed": ...}), whose config is taken whole when it was resolved from `preset`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} " + ("is not a file (a JSON object of preset keys)"
                                                          if path.exists() else "does not exist"))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object of preset keys")
    if set(data) == {"config", "seed"} and isinstance(data["config"], dict):  # a run's config.json
        run = dict(data["config"])
        if preset is not None and run.pop("preset", preset) != preset:
            theirs = data["config"]["preset"]
            raise ConfigError(f"config file {str(path)!r} is a run's config.json of preset {theirs!r}, not {preset!r}: "
                              f"pass --preset {theirs}")
        return run
    return data


def resolve(preset: str, overrides: Mapping | None = None) -> dict:
    """DEFAULTS, then the preset, then its FAMILY_SETTINGS for the chosen posterior, then `overrides`,
    validated (then the Gaussian family's warm-up from the epochs, GAUSSIAN_KL_WARMUP, unless
    overridden); raises ConfigError naming the key."""
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, names(), n=1, cutoff=0.5)
        raise ConfigError(f"unknown preset {preset!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; known presets: {', '.join(names())}")
    overrides = overrides or {}
    config = copy.deepcopy({**DEFAULTS, **PRESETS[preset]})
    family = overrides.get("posterior", config["posterior"])
    if isinstance(family, str):  # else the schema check below names the bad value
        config.update(copy.deepcopy(FAMILY_SETTINGS.get(preset, {}).get(family, {})))
    for key, value in overrides.items():
        if key not in SCHEMA:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(SCHEMA))}")
        config[key] = copy.deepcopy(value)
    if config["dataset"] != PRESETS[preset]["dataset"] and "data_args" not in overrides:
        config["data_args"] = {}  # the preset's data_args are its own data set's
    for key, spec in SCHEMA.items():
        _check_value(key, config[key], spec)
    if config["posterior"] == "gaussian" and "kl_warmup_epochs" not in overrides:
        config["kl_warmup_epochs"] = config["epochs"] * GAUSSIAN_KL_WARMUP
    _check_dataset_keys(config)
    _check_gaussian_p_init(config)
    return {"preset": preset, **config}


def _as_written(value) -> str:
    """A config value as the user wrote it: JSON (true, null, [true, 1]) where it is JSON's, else Python's repr
    (a string stays quoted as 'x')."""
    if isinstance(value, (bool, type(None), list, dict)):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):  # (an object no JSON holds, passed from Python)
            pass
    return repr(value)


def _check_value(key: str, value, spec) -> None:
    types, ok, expected = spec
    wrong_bool = isinstance(value, bool) and bool not in types  # True is an int to Python, not to us
    if wrong_bool or not isinstance(value, types) or not ok(value):
        # a --set value that failed to parse as JSON arrives as its text
        hint = (" (not valid JSON: quote the keys and strings, e.g. '{\"width\": 8}')"
                if isinstance(value, str) and value.lstrip()[:1] in ("{", "[") else "")
        shown = _as_written(value)
        raise ConfigError(f"config key {key!r} must be {expected}, got {shown}{hint}")


def _check_dataset_keys(config: dict) -> None:
    """The keys whose valid values depend on the dataset: data_args, input_size and autoaugment."""
    dataset, allowed = config["dataset"], DATA_ARGS.get(config["dataset"], {})
    for key, value in config["data_args"].items():
        if key not in allowed:
            raise ConfigError(f"config key 'data_args' of dataset {dataset} takes "
                              f"{', '.join(sorted(allowed)) or 'no keys'}; got {key!r}")
        _check_value(f"data_args.{key}", value, allowed[key])
    if config["autoaugment"] and dataset not in ("cifar10", "cifar100"):
        raise ConfigError(f"config key 'autoaugment' applies to CIFAR (the policy is AutoAugment's CIFAR one); "
                          f"dataset {dataset} takes false, got true")
    native = NATIVE_INPUT_SIZE.get(dataset)
    if native is not None and config["input_size"] != native:
        raise ConfigError(f"config key 'input_size' must be {native} for dataset {dataset} (its images are "
                          f"{native}x{native}), got {config['input_size']!r}")


def _check_gaussian_p_init(config: dict) -> None:
    """The Gaussian family starts at log alpha = logit(p_init), which training keeps inside +-LOG_ALPHA_LIMIT."""
    low, high = (1 / (1 + math.exp(limit)) for limit in (LOG_ALPHA_LIMIT, -LOG_ALPHA_LIMIT))
    if config["posterior"] == "gaussian" and not low <= config["p_init"] <= high:
        raise ConfigError(f"config key 'p_init' must be in [{low:.6g}, {high:.6g}] for the gaussian posterior "
                          f"(log alpha = logit(p_init) is clipped to +-{LOG_ALPHA_LIMIT:g}), got {config['p_init']!r}")


OBJECT_KEYS = ("supernet_args", "data_args")  # the keys whose value is an object of keys of its own


def apply_assignments(overrides: dict, assignments: list[str], preset: str) -> list[str]:
    """--set KEY=VALUE (parse_assignment) into `overrides` (in place), in order: a whole key replaces its value;
    OBJECT.KEY=VALUE sets one key of an object key (supernet_args, data_args), the rest of the object as
    `overrides` (a --config) or else the preset holds it (none of the preset's data_args for another data
    set). Returns notes on objects a whole --set replaced after the --config or an earlier --set set them,
    naming the keys lost."""
    notes = []
    assigned = set()  # object keys an earlier --set gave their value
    for text in assignments:
        key, value = parse_assignment(text)
        top, dot, inner = key.partition(".")
        if dot and top in OBJECT_KEYS and inner and preset in PRESETS:  # (resolve names an unknown preset)
            own = PRESETS[preset]
            if top in overrides:
                base = overrides[top]
            elif top == "data_args" and overrides.get("dataset", own["dataset"]) != own["dataset"]:
                base = {}
            else:
                base = own.get(top, DEFAULTS[top])
            overrides[top] = {**(base if isinstance(base, dict) else {}), inner: value}
            assigned.add(top)
            continue
        if key in OBJECT_KEYS and isinstance(overrides.get(key), dict) and isinstance(value, dict):
            if lost := [k for k in overrides[key] if k not in value]:
                whose = "an earlier --set's" if key in assigned else "the --config's"
                notes.append(f"--set {key} replaces {whose} {overrides[key]}: {', '.join(lost)} now take"
                             f"{'s' if len(lost) == 1 else ''} the default (--set {key}.KEY=VALUE sets one key)")
        overrides[key] = value
        assigned.add(key)
    return notes


def parse_assignment(text: str) -> tuple[str, object]:
    """KEY=VALUE from the command line; VALUE is JSON when it parses (numbers, lists, true), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set takes KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value

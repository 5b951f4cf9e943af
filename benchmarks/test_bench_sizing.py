"""What sizing a candidate for a size budget costs (search/budget.py: materialize it, count its
parameters and one image's MACs), on the CPU: the digits network and two paper networks at random
weights. The README's per-candidate figures come from here.

Run with `python3 -m pytest benchmarks/test_bench_sizing.py --benchmark-only`. Nothing asserts a time.
"""
from __future__ import annotations

import pytest
import torch

from pgnas_fast import configs
from pgnas_fast.nn import candidate_masks
from pgnas_fast.search.budget import candidate_size
from pgnas_fast.search.run import build_supernet


@pytest.mark.parametrize("preset", ["digits-tiny", "cifar10-supnet-m", "cifar10-supnet-e"])
def test_sizing_one_candidate(benchmark, preset):
    config = configs.resolve(preset)
    torch.manual_seed(0)
    model = build_supernet(config, configs.NUM_CLASSES[config["dataset"]]).eval()
    masks = [candidate_masks(model, 0, c) for c in range(4)]
    size = configs.input_shape(config)
    state = {"next": 0}

    def size_next():  # a new candidate each round (the same masks would be as costly; this is the honest case)
        state["next"] = (state["next"] + 1) % len(masks)
        return candidate_size(model, masks[state["next"]], size)

    result = benchmark.pedantic(size_next, rounds=5, iterations=1, warmup_rounds=1)
    assert result["params"] > 0

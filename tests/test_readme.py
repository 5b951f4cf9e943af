"""The README's Python blocks run as written, and say what they claim."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_every_python_block_of_the_readme_runs():
    blocks = _python_blocks()
    assert len(blocks) >= 2  # the Python API and the drop-in import
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})  # noqa: S102 - our own README


def test_the_python_api_block_computes_what_its_comments_say():
    (api,) = [block for block in _python_blocks() if "pf.ops.gated_apply" in block]
    names: dict = {}
    exec(compile(api, str(README), "exec"), names)  # noqa: S102 - our own README
    assert torch.equal(names["keep_r"], names["keep"][2:4])
    assert names["keep"].shape == (4, 16) and names["masks"].shape == (64, 16)
    assert names["x"].grad is None and names["p_logit"].grad is None  # nothing ran backward through them
    assert all(p.grad is not None for p in names["model"].parameters() if p.requires_grad)
    model, subnet, images = names["model"], names["subnet"], names["images"]
    names["set_gates"](model, "hard", seed=0, candidate=17)
    with torch.no_grad():
        torch.testing.assert_close(subnet(images), model(images), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in subnet.parameters()) < sum(p.numel() for p in model.parameters())

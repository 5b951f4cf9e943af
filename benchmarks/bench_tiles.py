"""Tile shapes of the Triton gate kernels (gated_apply forward and backward) on the GPU: the evidence
for `pgnas_fast.triton.gates._tiles`.

Every gate kernel shares one tile rule: BLOCK_Q rows (b, c) x BLOCK_S trailing positions per
program step, the long side along the stride-1 axis. Each row's gate is one Philox draw and a few
transcendentals, recomputed by every thread that holds part of the row, so a tile whose rows are
short per thread spends its time on gates, not bytes; a channel block much wider than C wastes
lanes. This script times the kernels themselves (no wrapper) for the rule in the package and for
other tile shapes, checks each shape writes the same output and dx bits as the package's rule (the
gate gradient's per-row sums follow the tile's order: their relative difference is printed), and
prints % of the device copy bandwidth. Results of one H200 run: benchmarks/results/nvidia-h200/.

    python3 benchmarks/bench_tiles.py --out tiles.json       # on the GPU
    python3 benchmarks/bench_tiles.py --dry-run              # tiny, CPU interpreter, to check it runs
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _configs(C: int, S: int, channels_last: bool, budget: int) -> list[tuple[int, int]]:
    """(BLOCK_Q, BLOCK_S) candidates: along S (NCHW) every power of two from next_pow2(S) down to 8,
    rows filling the element budget; along C (channels_last) channel blocks 16..128."""
    import triton

    out = []
    if channels_last:
        for block_q in (16, 32, 64, 128):
            out.append((block_q, max(1, min(triton.next_power_of_2(S), budget // block_q))))
    else:
        block_s = triton.next_power_of_2(S)
        while block_s >= 8:
            out.append((max(1, min(triton.next_power_of_2(C), budget // block_s)), block_s))
            block_s //= 2
    return out


def _launchers(gates, grid, meta, xv, dyv, out, dx, p_logit, partial, rng):
    """(forward, backward): the two kernels' launches as the package's wrappers make them."""
    B, C, S = xv.shape

    def forward():
        gates._gated_apply_kernel[grid](xv, out, p_logit, B * C, C, S, *xv.stride(), *out.stride(), *rng, **meta)

    def backward():
        gates._gated_apply_backward_kernel[grid](dyv, xv, dx, p_logit, partial, B * C, C, S, *dyv.stride(),
                                                 *xv.stride(), *dx.stride(), *rng, **meta)

    return forward, backward


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))  # the first paragraph
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton

    from pgnas_fast.triton import gates, philox

    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        shapes = [(2, 6, 7, 7), (2, 5, 3, 3)]

        def measure(fn):
            fn()
            return 1.0
    else:
        # the shapes where the first H200 run missed 80% of copy (rows of 49 and 196 elements, C = 160)
        # and the CIFAR ones of the Gaussian epilogue
        shapes = [(256, 1024, 7, 7), (256, 512, 14, 14), (128, 160, 32, 32), (128, 640, 8, 8), (128, 320, 16, 16)]

        def measure(fn):
            return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")

    src = torch.randn(1 << 26 if not args.dry_run else 1 << 10, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() * 4 / measure(lambda: dst.copy_(src)) / 1e6
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        B, C, H, W = shape
        S = H * W
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.randn(shape, device=device, generator=gen).contiguous(memory_format=fmt)
            dy = torch.randn(shape, device=device, generator=gen).contiguous(memory_format=fmt)
            p_logit = torch.randn(C, device=device, generator=gen)
            xv, dyv = gates._as_bcs(x), gates._as_bcs(dy)
            out = torch.empty_like(xv)
            dx = torch.empty_like(xv)
            partial = torch.empty(B, C, device=device)
            rng = gates._rng(12345, 678, 0, 0.2)
            grid_rows = B * C if device == "cpu" else C
            rule = gates._tiles(grid_rows, S, xv.stride(2), x.device)
            configs = [rule] + [c for c in _configs(C, S, channels_last, gates._elements_per_tile(x.device))
                                if c != rule]
            expected = None
            for block_q, block_s in configs:
                grid, split_rows = gates._grid(B, C, block_q, x.device)
                meta = {"MODE": 0, "GATE_F64": False, "COMPUTE_F64": False, "SPLIT_ROWS": split_rows,
                        "BLOCK_Q": block_q, "BLOCK_S": block_s, **philox.EXACT}  # (the package's binary)

                forward, backward = _launchers(gates, grid, meta, xv, dyv, out, dx, p_logit, partial, rng)
                for t in (out, dx, partial):
                    t.fill_(float("nan"))  # every element must be written
                forward()
                backward()
                got = (out.clone(), dx.clone(), partial.clone())
                if expected is None:
                    expected = got
                # out and dx are elementwise: the same bits whatever the tile; the per-row sums of the
                # gate gradient follow the tile's order, so only their relative difference is shown
                same = all(torch.equal(a, b) for a, b in zip(got[:2], expected[:2]))
                sums_apart = ((got[2] - expected[2]).norm() / expected[2].norm()).item()
                fwd_ms, bwd_ms = measure(forward), measure(backward)
                nbytes = x.numel() * x.element_size()
                row = {"shape": "x".join(map(str, shape)), "layout": "nhwc" if channels_last else "nchw",
                       "block_q": block_q, "block_s": block_s, "rule": (block_q, block_s) == rule, "same_bits": same,
                       "row_sums_rel_apart": sums_apart,
                       "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_pct_copy": 100 * 2 * nbytes / fwd_ms / 1e6 / copy_gbps,
                       "bwd_pct_copy": 100 * 3 * nbytes / bwd_ms / 1e6 / copy_gbps}
                rows.append(row)
                print(f"{row['shape']:>14} {row['layout']} Q={block_q:<4} S={block_s:<5}{' rule' if row['rule'] else '     '}"
                      f" fwd {fwd_ms:.4f} ms {row['fwd_pct_copy']:5.1f}%  bwd {bwd_ms:.4f} ms {row['bwd_pct_copy']:5.1f}%"
                      f"  sums {sums_apart:.0e}{'' if same else '  DIFFERENT BITS'}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_gbps": copy_gbps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

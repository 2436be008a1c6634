"""All linear products of SmolLM2-135M's 30 layers (qkv, o, gate_up, down) at a few row counts:
kiln's pair-packed bfloat16 kernel against float32 `F.linear` (MKL), weights streamed from memory as
in a step, plus the fused SiLU gate/up. Medians of 3 interleaved rounds, one process.

    .venv/bin/python benchmarks/linear_kernels.py 1 16 64 256
"""

import sys

import torch
import torch.nn.functional as F
from attention_kernels import interleaved_medians  # this script's directory is on sys.path when run

from kiln.model.layers import native

E, I, LAYERS = 576, 1536, 30
SHAPES = [(960, E), (E, E), (2 * I, E), (E, I)]  # (out, in): qkv, o, gate_up, down


def main() -> None:
    if native.pair_packed_linear() is None:
        raise SystemExit("the pair-packed kernels are unavailable on this machine")
    ops = torch.ops.kiln_native
    weights = [[(torch.randn(n, k) * 0.02).bfloat16() for n, k in SHAPES] for _ in range(LAYERS)]
    packed = [[ops.pack_weight_pairs(w) for w in layer] for layer in weights]
    dense = [[w.float() for w in layer] for layer in weights]
    for rows in [int(a) for a in sys.argv[1:]] or [1, 16, 64, 256]:
        x = {k: torch.randn(rows, k).bfloat16() for k in (E, I)}
        xf = {k: v.float() for k, v in x.items()}
        flops = 2 * rows * LAYERS * sum(n * k for n, k in SHAPES)
        ms = interleaved_medians({
            "packed": lambda: [ops.pair_packed_linear(x[k], p, None, n)
                               for layer in packed for p, (n, k) in zip(layer, SHAPES)],
            "dense": lambda: [F.linear(xf[k], w) for layer in dense for w, (n, k) in zip(layer, SHAPES)],
            "gated": lambda: [ops.pair_packed_silu_gate_up(x[E], layer[2], None, I) for layer in packed],
        }, reps=3)
        t_packed, t_dense, t_gated = (ms[name] / 1e3 for name in ("packed", "dense", "gated"))
        print(f"rows {rows:4d}: pair-packed bf16 {t_packed * 1e3:7.1f} ms ({flops / t_packed / 1e9:5.1f} GFLOP/s), "
              f"float32 F.linear {t_dense * 1e3:7.1f} ms ({flops / t_dense / 1e9:5.1f}), "
              f"fused gate_up x{LAYERS} {t_gated * 1e3:6.1f} ms", flush=True)


if __name__ == "__main__":
    main()

"""Core benchmark: memory and step time of one reversible sequence against plain autodiff.

For conv F/G (3x3 conv -> ReLU -> 3x3 conv) at several depths, measures, side by side in one run:

- compiled temporary memory of ``jit(grad(loss))`` (XLA's ``memory_analysis()``; rolled scan, the
  GPU/TPU configuration, and the backend's default unroll),
- median train-step time (forward + backward) with the backend's default unroll,

for the reversible sequence (``memory_saving=True``), plain autodiff and plain autodiff with
``jax.checkpoint`` per unit. Prints a Markdown table and writes it to ``--out``.

    python -m experiments.bench_core            # 4..64 units
    python -m experiments.bench_core --quick    # seconds, for CI
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from revjax import reversible_sequence
from revjax.measure import compiled_memory, time_interleaved

MODES = {
    "reversible": {"memory_saving": True},
    "plain": {"memory_saving": False},
    "checkpoint": {"memory_saving": False, "remat": True},
}


def _conv(w, x):  # [N, H, W, C] -> [N, H, W, C]
    return lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def residual(p, x):
    return _conv(p["w2"], jax.nn.relu(_conv(p["w1"], x)))


def make_problem(n, channels, batch, size, key):
    ks = jax.random.split(key, 6)
    scale = (2.0 / (9 * channels)) ** 0.5 * 0.5
    w = lambda k: scale * jax.random.normal(k, (n, 3, 3, channels, channels), jnp.float32)
    fp = {"w1": w(ks[0]), "w2": w(ks[1])}
    gp = {"w1": w(ks[2]), "w2": w(ks[3])}
    x1 = jax.random.normal(ks[4], (batch, size, size, channels), jnp.float32)
    x2 = jax.random.normal(ks[5], (batch, size, size, channels), jnp.float32)
    return fp, gp, x1, x2


def make_step(mode, unroll):
    opts = MODES[mode]

    def loss(fp, gp, x1, x2):
        y1, y2 = reversible_sequence(residual, residual, fp, gp, x1, x2, unroll=unroll, **opts)
        return jnp.mean(y1 * y1) + jnp.mean(y2 * y2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def run(depths, channels, batch, size, repeats):
    rows = []
    key = jax.random.PRNGKey(0)
    for n in depths:
        problem = make_problem(n, channels, batch, size, key)
        row = {"units": n}
        steps = {}
        for mode in MODES:
            row[f"mem_rolled_{mode}"] = compiled_memory(make_step(mode, 1), *problem)["temp"]
            steps[mode] = (make_step(mode, None), problem)
            row[f"mem_default_{mode}"] = compiled_memory(steps[mode][0], *problem)["temp"]
        # Round-robin timing: the three modes share the machine's load, so ratios are fair.
        times = time_interleaved(steps, warmup=2, repeats=repeats)
        for mode, t in times.items():
            row[f"time_{mode}"] = t["median"]
            row[f"compile_{mode}"] = t["compile"]
        rows.append(row)
        print(f"  measured {n} units", flush=True)
    return rows


def to_markdown(rows, header):
    mib = lambda b: f"{b / 2**20:.2f}"
    ms = lambda s: f"{s * 1e3:.1f}"
    lines = [
        header,
        "",
        "| units | temp MiB rev (rolled) | plain (rolled) | ckpt (rolled) | temp MiB rev (default "
        "unroll) | plain | ckpt | step ms rev | plain | ckpt | rev / plain time | plain / rev "
        "memory (rolled) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['units']} | {mib(r['mem_rolled_reversible'])} | {mib(r['mem_rolled_plain'])} "
            f"| {mib(r['mem_rolled_checkpoint'])} | {mib(r['mem_default_reversible'])} "
            f"| {mib(r['mem_default_plain'])} | {mib(r['mem_default_checkpoint'])} "
            f"| {ms(r['time_reversible'])} | {ms(r['time_plain'])} | {ms(r['time_checkpoint'])} "
            f"| {r['time_reversible'] / r['time_plain']:.2f} "
            f"| {r['mem_rolled_plain'] / r['mem_rolled_reversible']:.1f} |"
        )
    return "\n".join(lines)


def describe_hardware() -> str:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return f"{dev.platform} ({kind}), {os.cpu_count()} host cores, {platform.machine()}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    parser.add_argument("--depths", type=int, nargs="+", default=None)
    parser.add_argument("--channels", type=int, default=None, help="channels per half")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="spatial size (square)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/bench_core.md"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    quick = dict(depths=[2, 4], channels=4, batch=2, size=8, repeats=2)
    full = dict(depths=[4, 8, 16, 32, 64], channels=16, batch=32, size=32, repeats=5)
    cfg = quick if args.quick else full
    for name in cfg:
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    header = (
        f"Core benchmark ({datetime.date.today()}, {describe_hardware()}, jax {jax.__version__}): "
        f"conv F/G, {cfg['channels']} channels per half, batch {cfg['batch']}, "
        f"{cfg['size']}x{cfg['size']}, float32; step time: median of {cfg['repeats']} "
        f"interleaved rounds; `python -m experiments.bench_core {' '.join(argv)}`"
    )
    print(header, flush=True)
    rows = run(cfg["depths"], cfg["channels"], cfg["batch"], cfg["size"], cfg["repeats"])
    table = to_markdown(rows, header)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()

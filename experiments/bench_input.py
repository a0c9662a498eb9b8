"""Benchmark: input-pipeline throughput, and what it leaves of the train step.

Three measurements, each with its variants' samples interleaved (round-robin) so that ratios
are taken under the same load (`revjax.measure.time_interleaved`):

1. **Input only, CIFAR-shaped** (uint8 32x32x3, the paper's augmentation: mean subtraction,
   pad to 36, random 32x32 crop, flip): the device-resident pipeline
   (`revjax.data.DeviceTrainInput`: the batch gathered and augmented by XLA from the split in
   device memory, the per-epoch permutation amortised) against Grain (per-example numpy,
   `revjax.data.cifar_train_transform`) with 0, 1 and 2 worker processes. Images are
   fabricated (random), so no dataset is needed.
2. **ImageNet-like, per Grain worker**: fabricated JPEGs of a typical ImageNet size (500x375,
   smooth random content, quality 90) decoded with PIL and augmented with
   `revjax.data.imagenet_train_transform` (random resized crop to 224, flip, colour jitter),
   with 0 workers (one reader thread: one host core) and 1, 2 worker processes. From the
   one-core rate: how many host cores one GPU needs to be fed at an assumed train-step
   throughput (``--gpu-images-per-s``, stated in the table; not measured here).
3. **Train step, real input vs the ceiling**: the trainer's step (SGD + momentum, BatchNorm)
   fed by the device pipeline (batch built inside the step), by Grain (0 workers, batches
   copied to the device from a prefetch thread), and with a fixed batch already on the device
   (the synthetic-input ceiling).

Targets (this 2-core CPU machine): device CIFAR input >= 100k images/s; train step with the
device pipeline within 5 % of the synthetic ceiling.

    python -m experiments.bench_input                 # the full run (a few minutes on CPU)
    python -m experiments.bench_input --quick         # seconds, for the tests

Writes ``<out-dir>/bench_input.md`` and ``<out-dir>/bench_input.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import _report
from revjax import data, train
from revjax.data import grain_pipeline

NAME = "bench_input"
MODULE = f"experiments.{NAME}"


# --------------------------------------------------------------------------------------------
# Fabricated sources (module level: Grain worker processes pickle them)
# --------------------------------------------------------------------------------------------


class ArraySource:
    """Random-access `{"image": uint8[H, W, C], "label": int}` over in-memory arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


class JpegSource:
    """Random-access examples decoded from JPEG bytes with PIL, as a TFDS source does."""

    def __init__(self, jpegs: list[bytes], labels: np.ndarray):
        self.jpegs, self.labels = jpegs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        with Image.open(io.BytesIO(self.jpegs[i])) as im:
            image = np.asarray(im.convert("RGB"))
        return {"image": image, "label": int(self.labels[i])}


@dataclasses.dataclass(frozen=True)
class CifarAugment:
    mean: np.ndarray

    def __call__(self, example, rng):
        return data.cifar_train_transform(example, rng, self.mean)


@dataclasses.dataclass(frozen=True)
class ImagenetAugment:
    image_size: int

    def __call__(self, example, rng):
        return data.imagenet_train_transform(example, rng, self.image_size)


def fabricate_cifar(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int32)
    mean = images.mean(axis=0, dtype=np.float64).astype(np.float32)
    return images, labels, mean


def fabricate_jpegs(n: int, height: int, width: int, seed: int = 0) -> list[bytes]:
    """Smooth random photos-like images (upsampled noise plus grain), JPEG quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image).astype(np.int16) + rng.integers(-8, 9, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def _one_device_sharding() -> NamedSharding:
    return NamedSharding(Mesh(np.asarray(jax.devices()[:1]), ("data",)), P("data"))


def _grain_batches(source, transform, batch, workers, *, seed=0):
    ds = grain_pipeline.stream_from_source(source, transform, batch_size=batch, seed=seed)
    # One reader thread without workers: the rate of one host core.
    return grain_pipeline.iterate(ds, num_threads=1 if workers == 0 else None,
                                  num_workers=workers)


def _interleaved(fns, *, warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per call of each ``fn()``: median and min wall seconds, median process CPU seconds.

    Samples are taken round-robin (A, B, C, A, B, C, ...) so ratios share the load. CPU time is
    `time.process_time()` of this process (all its threads: XLA's and Grain's reader threads),
    the work a call costs whatever else runs on the machine.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {
        name: {"wall": float(np.median(wall[name])), "wall_min": min(wall[name]),
               "cpu": float(np.median(cpu[name]))}
        for name in fns
    }


def _sustained(it, batches: int, warmup: int = 2) -> float:
    """Seconds per batch over ``batches`` consecutive batches (after ``warmup``): for worker
    pipelines, whose buffers would fill while other variants are timed if interleaved."""
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - start) / batches


def _close(it) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def input_only(args) -> list[dict]:
    """Images/s of the device pipeline and of Grain with each worker count (CIFAR-shaped)."""
    images, labels, mean = fabricate_cifar(args.num_examples)
    inp = data.DeviceTrainInput(
        "cifar10", batch_size=args.batch, seed=0, batch_sharding=_one_device_sharding(),
        arrays=(images, labels), mean=mean,
    )
    batch_fn = jax.jit(inp.batch)
    counter = iter(range(10**9))

    def device_batches():
        out = None
        for _ in range(args.device_batches):
            k = next(counter)
            out = batch_fn(*inp.step_args(k), np.int32(k))
        return out

    g = args.grain_examples
    source, transform = ArraySource(images[:g], labels[:g]), CifarAugment(mean)
    it0 = _grain_batches(source, transform, args.batch, 0)

    def grain_batches():
        return [next(it0) for _ in range(args.grain_batches)][-1]

    # In-process variants side by side (wall and CPU time per image).
    times = _interleaved({"device": device_batches, "grain, 0 workers": grain_batches},
                         warmup=2, repeats=args.repeats)
    _close(it0)
    rows = []
    for name, t in times.items():
        n = (args.device_batches if name == "device" else args.grain_batches) * args.batch
        rows.append({"pipeline": name, "images_per_s": n / t["wall"],
                     "images_per_cpu_s": n / max(t["cpu"], 1e-9)})
    # Worker processes: sustained rate, one after the other.
    for w in [w for w in args.workers if w > 0]:
        it = _grain_batches(source, transform, args.batch, w)
        per_batch = _sustained(it, args.sustained_batches)
        _close(it)
        rows.append({"pipeline": f"grain, {w} workers", "images_per_s": args.batch / per_batch,
                     "images_per_cpu_s": None})
    return rows


def imagenet_like(args) -> list[dict]:
    """Images/s of ImageNet-like JPEG decoding + augmentation: per host core (CPU time of one
    reader thread in this process) and with Grain worker processes (sustained wall rate)."""
    jpegs = fabricate_jpegs(args.jpegs, *args.jpeg_size)
    labels = np.zeros(len(jpegs), np.int32)
    source, transform = JpegSource(jpegs, labels), ImagenetAugment(args.image_size)
    rows = []
    it = _grain_batches(source, transform, args.jpeg_batch, 0)
    t = _interleaved({"0": lambda: next(it)}, warmup=1, repeats=args.jpeg_batches)["0"]
    _close(it)
    rows.append({"workers": 0, "images_per_s": args.jpeg_batch / t["wall"],
                 "images_per_cpu_s": args.jpeg_batch / max(t["cpu"], 1e-9)})
    for w in [w for w in args.workers if w > 0]:
        it = _grain_batches(source, transform, args.jpeg_batch, w)
        per_batch = _sustained(it, args.jpeg_batches, warmup=1)
        _close(it)
        rows.append({"workers": w, "images_per_s": args.jpeg_batch / per_batch,
                     "images_per_cpu_s": None})
    return rows


def train_steps(args) -> list[dict]:
    """Train-step images/s: device pipeline, Grain + prefetch, fixed synthetic batch."""
    images, labels, mean = fabricate_cifar(max(args.grain_examples, 2 * args.train_batch))
    config = train.TrainConfig(model=args.model, batch_size=args.train_batch,
                               model_overrides=dict(args.model_overrides))
    graphdef, state, tx = train.create_train_state(config, 10, 3)
    base = train.make_train_step(graphdef, tx)
    sharding = _one_device_sharding()
    inp = data.DeviceTrainInput(
        "cifar10", batch_size=args.train_batch, seed=0, batch_sharding=sharding,
        arrays=(images, labels), mean=mean,
    )
    fused = jax.jit(inp.wrap_step(base))
    plain = jax.jit(base)
    synthetic = inp.batch_at(0)  # a real batch, computed once: the ceiling's fixed input
    grain_in = data.GrainTrainInput(
        _grain_batches(ArraySource(images, labels), CifarAugment(mean), args.train_batch, 0),
        sharding, prefetch=2,
    )
    fns = {
        "synthetic (fixed batch on device)": lambda: plain(state, synthetic),
        "device pipeline (fused)": lambda: fused(state, *inp.step_args(0)),
        "grain, 0 workers + prefetch": lambda: plain(state, *grain_in.step_args(0)),
    }
    times = _interleaved(fns, warmup=2, repeats=args.repeats)
    grain_in.close()
    ceiling = times["synthetic (fixed batch on device)"]
    return [
        {
            "input": name,
            "ms": t["wall"] * 1e3,
            "ms_min": t["wall_min"] * 1e3,
            "cpu_ms": t["cpu"] * 1e3,
            "images_per_s": args.train_batch / t["wall"],
            "vs_ceiling": ceiling["wall"] / t["wall"],
            "vs_ceiling_min": ceiling["wall_min"] / t["wall_min"],
            "vs_ceiling_cpu": ceiling["cpu"] / t["cpu"],
        }
        for name, t in times.items()
    ]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(value, digits=0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(args, argv, inputs, jpeg_rows, steps) -> str:
    command = _report.command_line(MODULE, argv)
    grain0 = next((r["images_per_s"] for r in inputs if r["pipeline"] == "grain, 0 workers"),
                  None)
    head = _report.header(
        "Input pipeline throughput",
        f"CIFAR-shaped uint8 32x32x3 (fabricated), batch {args.batch}, device split of "
        f"{args.num_examples} images, Grain source of {args.grain_examples} (one reader thread "
        f"without workers); device and Grain 0 workers: median of {args.repeats} interleaved "
        f"rounds; Grain with workers: sustained rate over {args.sustained_batches} batches, "
        "run one after the other (interleaved, their buffers fill while others are timed)",
        command,
    )
    table1 = _report.markdown_table(
        ["CIFAR input only", "images/s (wall)", "images per CPU-second", "x grain 0 workers"],
        [
            [r["pipeline"], _fmt(r["images_per_s"]), _fmt(r["images_per_cpu_s"]),
             f"{r['images_per_s'] / grain0:.1f}" if grain0 else "-"]
            for r in inputs
        ],
    )
    one_core = next((r["images_per_cpu_s"] for r in jpeg_rows if r["workers"] == 0), None)
    table2 = _report.markdown_table(
        ["ImageNet-like, Grain workers", "images/s (wall)", "images per CPU-second"],
        [
            [str(r["workers"]) if r["workers"] else "0 (one reader thread)",
             _fmt(r["images_per_s"], 1), _fmt(r["images_per_cpu_s"], 1)]
            for r in jpeg_rows
        ],
    )
    table3 = _report.markdown_table(
        ["train step input", "ms / step (median)", "ms (min)", "CPU ms", "images/s",
         "x ceiling (median)", "x ceiling (min)", "x ceiling (CPU)"],
        [[r["input"], f"{r['ms']:.1f}", f"{r['ms_min']:.1f}", f"{r['cpu_ms']:.1f}",
          f"{r['images_per_s']:,.1f}", f"{r['vs_ceiling']:.3f}", f"{r['vs_ceiling_min']:.3f}",
          f"{r['vs_ceiling_cpu']:.3f}"]
         for r in steps],
    )
    model = args.model + (f" {dict(args.model_overrides)}" if args.model_overrides else "")
    cores = (f"One host core decodes and augments {one_core:,.1f} ImageNet-like images per "
             f"CPU-second, so one GPU training at an assumed {args.gpu_images_per_s:,.0f} "
             f"images/s needs about {args.gpu_images_per_s / one_core:.0f} host cores of Grain "
             "workers (the throughput is an assumption, `--gpu-images-per-s`, not measured "
             "here).") if one_core else ""
    lines = [
        head, "", table1, "",
        f"ImageNet-like: {args.jpegs} fabricated JPEGs of {args.jpeg_size[1]}x"
        f"{args.jpeg_size[0]} (quality 90), PIL decode + random resized crop to "
        f"{args.image_size}, flip, colour jitter; batch {args.jpeg_batch}. " + cores, "",
        table2, "",
        f"Train step: {model}, batch {args.train_batch}, 32x32x3, SGD + momentum, BatchNorm; "
        "the ceiling is the same step on a fixed batch already on the device; median of "
        f"{args.repeats} interleaved rounds; CPU ms is this process's CPU time per step (all "
        "threads), the work whatever the load.", "", table3, "",
    ]
    return "\n".join(lines)


def plot(path: Path, inputs, jpeg_rows, steps, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    panels = [
        ("CIFAR input only", [(r["pipeline"], r["images_per_s"]) for r in inputs]),
        ("ImageNet-like, Grain", [(f"{r['workers']} workers", r["images_per_s"])
                                  for r in jpeg_rows]),
        ("train step", [(r["input"].split(" (")[0], r["images_per_s"]) for r in steps]),
    ]
    for i, (name, bars) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        labels = [b[0] for b in bars]
        ax.barh(range(len(bars)), [b[1] for b in bars], color=f"C{i}")
        ax.set_yticks(range(len(bars)), labels, fontsize=7)
        ax.invert_yaxis()
        if i == 0:  # rates two orders of magnitude apart
            ax.set_xscale("log")
            ax.set_xlabel("images/s (log scale)", fontsize=8)
        else:
            ax.set_xlim(left=0)
            ax.set_xlabel("images/s", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--num-examples", type=int, default=50_000)
    parser.add_argument("--grain-examples", type=int, default=5_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="revnet38")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--jpegs", type=int, default=64)
    parser.add_argument("--gpu-images-per-s", type=float, default=1000.0,
                        help="assumed train-step throughput of one GPU on ImageNet")
    args = parser.parse_args(argv)
    args.model_overrides = ()
    args.device_batches, args.grain_batches, args.sustained_batches = 20, 2, 20
    args.jpeg_size, args.jpeg_batch, args.jpeg_batches, args.image_size = (375, 500), 8, 3, 224
    if args.quick:
        args.num_examples, args.grain_examples, args.batch = 512, 256, 32
        args.workers, args.repeats, args.jpegs = [0, 1], 2, 8
        args.model, args.train_batch = "revnet_tiny", 16
        args.model_overrides = (("widths", (8, 8, 16)),)
        args.device_batches, args.grain_batches, args.sustained_batches = 4, 1, 2
        args.jpeg_size, args.jpeg_batch, args.jpeg_batches, args.image_size = (60, 80), 4, 1, 32

    start = time.perf_counter()
    inputs = input_only(args)
    jpeg_rows = imagenet_like(args)
    steps = train_steps(args)
    text = report(args, argv, inputs, jpeg_rows, steps)
    out_dir = Path(args.out_dir)
    _report.write_report(out_dir, NAME, text)
    plot(out_dir / f"{NAME}.png", inputs, jpeg_rows, steps,
         f"Input pipelines, {_report.hardware_label()}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return {"input": inputs, "imagenet": jpeg_rows, "train": steps}


if __name__ == "__main__":
    main()

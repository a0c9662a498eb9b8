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
from revjax.data import grain_pipeline, imagenet
from revjax.data.prepare import presize_jpeg

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


def _interleaved(fns, *, warmup: int, repeats: int,
                 clock=time.process_time) -> dict[str, dict[str, float]]:
    """Per call of each ``fn()``: median and min wall seconds, median CPU seconds.

    Samples are taken round-robin (A, B, C, A, B, C, ...) so ratios share the load. CPU time is
    `clock`: by default `time.process_time()` of this process (all its threads: XLA's and
    Grain's reader threads), the work a call costs whatever else runs on the machine;
    `time.thread_time` for work done in the calling thread alone.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), clock()
            jax.block_until_ready(fn())
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(clock() - c0)
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


class BytesSource:
    """Random-access `{"image": JPEG bytes, "label"}`, as `make_source(..., encoded=True)`."""

    def __init__(self, jpegs: list[bytes], labels: np.ndarray):
        self.jpegs, self.labels = jpegs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.jpegs[i], "label": int(self.labels[i])}


def _host_variants(args, jpegs, presized):
    """(name, source, transform, bytes shipped per image) of each ImageNet host path."""
    labels = np.zeros(len(jpegs), np.int32)
    size = args.image_size
    old_bytes = size * size * 3 * 4  # float32
    new_bytes = size * size * 3  # uint8
    variants = [
        ("old: PIL full decode, numpy augment, float32", JpegSource(jpegs, labels),
         ImagenetAugment(size), old_bytes),
        ("new: simplejpeg, reduced decode, uint8", BytesSource(jpegs, labels),
         imagenet.ImageNetTrainCrop(size, 8, "simplejpeg"), new_bytes),
        ("new: PIL draft, reduced decode, uint8", BytesSource(jpegs, labels),
         imagenet.ImageNetTrainCrop(size, 8, "pil"), new_bytes),
        ("new: simplejpeg, full-size decode, uint8", BytesSource(jpegs, labels),
         imagenet.ImageNetTrainCrop(size, 1, "simplejpeg"), new_bytes),
    ]
    for side, small in presized.items():
        variants.append((f"new: simplejpeg, pre-sized to {side}, uint8",
                         BytesSource(small, labels),
                         imagenet.ImageNetTrainCrop(size, 8, "simplejpeg"), new_bytes))
    return variants


def imagenet_like(args) -> tuple[list[dict], list[dict], list[dict]]:
    """ImageNet-like JPEGs through the old and the new host path: images per host core-second
    (CPU time of one reader thread, interleaved rounds), bytes shipped per image, cores one
    GPU needs; the new path with Grain worker processes; pre-sizing's disk and decode rates."""
    jpegs = fabricate_jpegs(args.jpegs, *args.jpeg_size)
    presized = {side: [presize_jpeg(j, side) for j in jpegs] for side in args.max_sides}
    variants = _host_variants(args, jpegs, presized)

    def one_batch(source, transform):
        # What one Grain reader does per batch, synchronously in this thread: read (the old
        # path's source decodes), transform with a per-record generator, stack.
        counter = iter(range(10**9))

        def run():
            k = next(counter)
            rng = np.random.default_rng(k)
            out = [transform(source[(k * args.jpeg_batch + i) % len(source)], rng)
                   for i in range(args.jpeg_batch)]
            return np.stack([o["image"] for o in out])

        return run

    times = _interleaved({name: one_batch(src, tr) for name, src, tr, _ in variants},
                         warmup=1, repeats=args.jpeg_batches, clock=time.thread_time)
    rows = []
    for name, _, _, nbytes in variants:
        per_cpu_s = args.jpeg_batch / max(times[name]["cpu"], 1e-9)
        rows.append({"pipeline": name, "images_per_cpu_s": per_cpu_s,
                     "images_per_s": args.jpeg_batch / times[name]["wall"],
                     "bytes_per_image": nbytes,
                     "cores_per_gpu": args.gpu_images_per_s / per_cpu_s})
    workers = []
    new_name, src, tr, _ = variants[1]
    for w in [w for w in args.workers if w > 0]:
        it = _grain_batches(src, tr, args.jpeg_batch, w)
        per_batch = _sustained(it, args.jpeg_batches, warmup=1)
        _close(it)
        workers.append({"pipeline": new_name, "workers": w,
                        "images_per_s": args.jpeg_batch / per_batch})
    # Pre-sizing: stored bytes and the decode alone (full size, simplejpeg), per core.
    import simplejpeg

    sets = {"original": jpegs, **{f"max side {k}": v for k, v in presized.items()}}

    def decode_all(items):
        return lambda: [simplejpeg.decode_jpeg(j, "RGB") for j in items]

    dec = _interleaved({k: decode_all(v) for k, v in sets.items()}, warmup=1,
                       repeats=args.jpeg_batches, clock=time.thread_time)
    sizing = []
    for k, items in sets.items():
        shape = simplejpeg.decode_jpeg_header(items[0])[:2]
        sizing.append({"images": k, "size": f"{shape[1]}x{shape[0]}",
                       "bytes_per_image": float(np.mean([len(j) for j in items])),
                       "decodes_per_cpu_s": len(items) / max(dec[k]["cpu"], 1e-9)})
    return rows, workers, sizing


def reduced_crop_share(image_hw, image_size: int, draws: int = 20_000) -> float:
    """The fraction of Inception crops of an image of size `image_hw` decoded below 1/1."""
    rng = np.random.default_rng(0)
    boxes = [data.transforms.random_crop_box(*image_hw, rng) for _ in range(draws)]
    return float(np.mean([imagenet.reduction_for(h, w, image_size) > 1 for _, _, h, w in boxes]))


def _dali_rate(args) -> dict | None:
    """DALI (GPU mixed decoder) images/s and host CPU time per image, on a GPU with DALI."""
    from revjax.data import dali_pipeline

    if not dali_pipeline.dali_available():
        return None
    jpegs = fabricate_jpegs(args.jpegs, *args.jpeg_size)
    source = BytesSource(jpegs, np.zeros(len(jpegs), np.int32))
    batch = args.dali_batch
    inp = dali_pipeline.DaliTrainInput(batch_size=batch, seed=0, source=source,
                                       batch_sharding=_one_device_sharding(),
                                       image_size=args.image_size, prefetch=2)
    t = _interleaved({"dali": lambda: inp.step_args(0)[0]["image"]}, warmup=2,
                     repeats=args.dali_batches)["dali"]
    inp.close()
    return {"pipeline": "DALI, mixed (GPU) decoder, uint8", "images_per_s": batch / t["wall"],
            "images_per_cpu_s": batch / max(t["cpu"], 1e-9),
            "bytes_per_image": args.image_size**2 * 3}


def imagenet_steps(args) -> list[dict]:
    """The train step on ImageNet-shaped batches: fixed float batch on the device (the
    ceiling) vs uint8 crops from the new host path (prefetched) augmented inside the step
    (and DALI's crops, on a GPU with DALI)."""
    size, batch = args.image_size, args.step_batch
    config = train.TrainConfig(model=args.step_model, batch_size=batch, dataset="imagenet2012",
                               model_overrides=dict(args.step_overrides))
    graphdef, state, tx = train.create_train_state(config, 1000, 3)
    base = train.make_train_step(graphdef, tx)
    sharding = _one_device_sharding()
    jpegs = fabricate_jpegs(max(args.jpegs, 2 * batch), *args.jpeg_size)
    source = BytesSource(jpegs, np.arange(len(jpegs), dtype=np.int32) % 1000)
    host_it = imagenet.train_iterator(batch_size=batch, seed=0, image_size=size, source=source,
                                      num_threads=None, num_workers=args.step_workers)
    host = imagenet.ImageNetTrainInput(host_it, sharding, seed=0, prefetch=4)
    plain = jax.jit(base)
    fused = jax.jit(host.wrap_step(base))
    first = host.step_args(0)[0]
    synthetic = jax.block_until_ready(host.augment(first, 0))  # a real batch, fixed
    counter = iter(range(1, 10**9))
    fns = {
        "fixed float32 batch on the device": lambda: plain(state, synthetic),
        "new host path (uint8, augmented in the step)":
            lambda: fused(state, *host.step_args(next(counter))),
    }
    dali_in = None
    from revjax.data import dali_pipeline

    if dali_pipeline.dali_available():
        dali_in = dali_pipeline.DaliTrainInput(batch_size=batch, seed=0, source=source,
                                               batch_sharding=sharding, image_size=size)
        dali_fused = jax.jit(dali_in.wrap_step(base))
        fns["DALI (uint8, augmented in the step)"] = (
            lambda: dali_fused(state, *dali_in.step_args(next(counter))))
    times = _interleaved(fns, warmup=2, repeats=args.repeats)
    host.close()
    if dali_in is not None:
        dali_in.close()
    ceiling = times["fixed float32 batch on the device"]
    return [
        {"input": name, "ms": t["wall"] * 1e3, "ms_min": t["wall_min"] * 1e3,
         "cpu_ms": t["cpu"] * 1e3, "images_per_s": batch / t["wall"],
         "vs_ceiling": ceiling["wall"] / t["wall"],
         "vs_ceiling_min": ceiling["wall_min"] / t["wall_min"],
         "vs_ceiling_cpu": ceiling["cpu"] / t["cpu"]}
        for name, t in times.items()
    ]


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


def report(args, argv, inputs, imagenet_rows, steps, image_steps) -> str:
    jpeg_rows, worker_rows, sizing, dali = imagenet_rows
    command = _report.command_line(MODULE, argv)
    cifar = inputs is not None
    head = _report.header(
        "Input pipeline throughput",
        (f"CIFAR-shaped uint8 32x32x3 (fabricated), batch {args.batch}, device split of "
         f"{args.num_examples} images, Grain source of {args.grain_examples} (one reader thread "
         f"without workers); device and Grain 0 workers: median of {args.repeats} interleaved "
         f"rounds; Grain with workers: sustained rate over {args.sustained_batches} batches, "
         "run one after the other (interleaved, their buffers fill while others are timed)")
        if cifar else "ImageNet sections only",
        command,
    )
    table1 = ""
    if cifar:
        grain0 = next((r["images_per_s"] for r in inputs if r["pipeline"] == "grain, 0 workers"),
                      None)
        table1 = _report.markdown_table(
            ["CIFAR input only", "images/s (wall)", "images per CPU-second", "x grain 0 workers"],
            [
                [r["pipeline"], _fmt(r["images_per_s"]), _fmt(r["images_per_cpu_s"]),
                 f"{r['images_per_s'] / grain0:.1f}" if grain0 else "-"]
                for r in inputs
            ],
        )
    old = jpeg_rows[0]["images_per_cpu_s"]
    rate_rows = [
        [r["pipeline"], _fmt(r["images_per_cpu_s"], 0), f"{r['images_per_cpu_s'] / old:.1f}",
         _fmt(r["bytes_per_image"]), f"{r['cores_per_gpu']:.1f}"]
        for r in jpeg_rows
    ]
    if dali is not None:
        rate_rows.append([dali["pipeline"] + f" ({_fmt(dali['images_per_s'])} images/s wall)",
                          _fmt(dali["images_per_cpu_s"], 0),
                          f"{dali['images_per_cpu_s'] / old:.1f}",
                          _fmt(dali["bytes_per_image"]),
                          f"{args.gpu_images_per_s / dali['images_per_cpu_s']:.2f}"])
    table2 = _report.markdown_table(
        ["ImageNet-like host path", "images per host core-second", "x old",
         "bytes shipped per image", f"host cores per GPU at {args.gpu_images_per_s:,.0f} img/s"],
        rate_rows,
    )
    table3 = _report.markdown_table(
        ["new host path, Grain worker processes", "images/s (wall, this machine)"],
        [[str(r["workers"]), _fmt(r["images_per_s"], 1)] for r in worker_rows],
    )
    full = sizing[0]
    table4 = _report.markdown_table(
        ["stored JPEGs", "size", "bytes per image (disk)", "x original",
         "full decodes per CPU-second", "decode speed-up"],
        [[r["images"], r["size"], _fmt(r["bytes_per_image"]),
          f"{r['bytes_per_image'] / full['bytes_per_image']:.2f}",
          _fmt(r["decodes_per_cpu_s"]),
          f"{r['decodes_per_cpu_s'] / full['decodes_per_cpu_s']:.1f}"] for r in sizing],
    )

    def step_table(rows):
        return _report.markdown_table(
            ["train step input", "ms / step (median)", "ms (min)", "CPU ms", "images/s",
             "x ceiling (median)", "x ceiling (min)", "x ceiling (CPU)"],
            [[r["input"], f"{r['ms']:.1f}", f"{r['ms_min']:.1f}", f"{r['cpu_ms']:.1f}",
              f"{r['images_per_s']:,.1f}", f"{r['vs_ceiling']:.3f}",
              f"{r['vs_ceiling_min']:.3f}", f"{r['vs_ceiling_cpu']:.3f}"]
             for r in rows],
        )

    model = args.model + (f" {dict(args.model_overrides)}" if args.model_overrides else "")
    step_model = args.step_model + (
        f" {dict(args.step_overrides)}" if args.step_overrides else "")
    best = max(jpeg_rows[1:], key=lambda r: r["images_per_cpu_s"])
    reduced_share = reduced_crop_share(args.jpeg_size, args.image_size)
    lines = [
        head, "", *([table1, ""] if cifar else []),
        f"ImageNet-like: {args.jpegs} fabricated JPEGs of {args.jpeg_size[1]}x"
        f"{args.jpeg_size[0]} (smooth content plus grain, quality 90), batch {args.jpeg_batch}, "
        f"output {args.image_size}x{args.image_size}; per host core: the CPU time of the "
        "calling thread reading, transforming and stacking a batch, as one Grain reader does, "
        f"median over {args.jpeg_batches} interleaved batches per variant. The old path decodes "
        "the whole JPEG with PIL and runs the Inception crop, flip and colour jitter in float32 "
        "numpy, shipping float32; the new one samples the crop from the header, decodes at the "
        f"smallest libjpeg scale covering it (1/2 needs a crop side of at least 2 x "
        f"{args.image_size}: {reduced_share:.1%} of the crops of these images; more for larger "
        "photos or a lower training resolution), resizes to uint8 and leaves flip, "
        "jitter and scaling to the train step. Best new path: "
        f"{best['images_per_cpu_s']:,.0f} images per host core-second, "
        f"{best['images_per_cpu_s'] / old:.1f}x the old {old:,.0f}; host cores are what one GPU "
        f"at an assumed {args.gpu_images_per_s:,.0f} images/s needs (`--gpu-images-per-s`).",
        "", table2, "", table3, "",
        "Pre-sizing (`python -m revjax.prepare imagenet2012 --max-side N`): the same JPEGs "
        "re-encoded once with the longest side at most N (quality 90), the disk bytes and a "
        "full-size decode alone (simplejpeg), interleaved.", "", table4, "",
        f"Train step, ImageNet-shaped: {step_model}, batch {args.step_batch}, "
        f"{args.image_size}x{args.image_size}x3, 1000 classes, SGD + momentum; the ceiling is "
        "the step on a fixed float32 batch already on the device; the new host path feeds "
        f"uint8 crops (Grain, {args.step_workers} worker processes, prefetch 4) and the step "
        f"flips, jitters and scales them; median of {args.repeats} interleaved rounds. On this "
        "CPU the augmentation shares the cores with the model; on an accelerator it is a few "
        "elementwise passes over the batch.", "", step_table(image_steps), "",
    ]
    if cifar:
        lines += [
            f"Train step, CIFAR-shaped: {model}, batch {args.train_batch}, 32x32x3, SGD + "
            "momentum, BatchNorm; the ceiling is the same step on a fixed batch already on the "
            f"device; median of {args.repeats} interleaved rounds; CPU ms is this process's CPU "
            "time per step (all threads), the work whatever the load.", "", step_table(steps),
            "",
        ]
    return "\n".join(lines)


def plot(path: Path, inputs, imagenet_rows, steps, image_steps, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    jpeg_rows = imagenet_rows[0]
    fig = Figure(figsize=(13, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    panels = [
        ("CIFAR input only, images/s",
         [(r["pipeline"], r["images_per_s"]) for r in inputs or []]),
        ("ImageNet-like, images per host core-second",
         [(r["pipeline"].replace(", uint8", "").replace(", float32", ""),
           r["images_per_cpu_s"]) for r in jpeg_rows]),
        ("train step, ImageNet-shaped, images/s",
         [(r["input"].split(" (")[0], r["images_per_s"]) for r in image_steps]),
        ("train step, CIFAR-shaped, images/s",
         [(r["input"].split(" (")[0], r["images_per_s"]) for r in steps or []]),
    ]
    panels = [p for p in panels if p[1]]
    for i, (name, bars) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        labels = [b[0] for b in bars]
        ax.barh(range(len(bars)), [b[1] for b in bars], color=f"C{i}")
        ax.set_yticks(range(len(bars)), labels, fontsize=6)
        ax.invert_yaxis()
        if name.startswith("CIFAR"):  # rates two orders of magnitude apart
            ax.set_xscale("log")
        else:
            ax.set_xlim(left=0)
        ax.set_title(name, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
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
    parser.add_argument("--gpu-images-per-s", type=float, default=2000.0,
                        help="assumed train-step throughput of one GPU on ImageNet")
    parser.add_argument("--max-sides", type=int, nargs="*", default=[320, 256],
                        help="pre-sized variants: longest side at most N")
    parser.add_argument("--imagenet-only", action="store_true",
                        help="skip the CIFAR-shaped sections (the GPU check)")
    parser.add_argument("--step-model", default="revnet104")
    parser.add_argument("--step-full", action="store_true",
                        help="the preset's own widths and depth (default: narrowed for a CPU)")
    parser.add_argument("--step-batch", type=int, default=16)
    parser.add_argument("--step-workers", type=int, default=1,
                        help="Grain worker processes feeding the ImageNet-shaped train step")
    args = parser.parse_args(argv)
    args.model_overrides = ()
    # RevNet-104's ImageNet layout (stem, 4 stages) narrowed to run on a CPU.
    args.step_overrides = () if args.step_full else (
        ("units_per_stage", (2, 2, 2, 2)), ("widths", (16, 16, 16, 32, 64)))
    args.dali_batch, args.dali_batches = 64, 5
    args.device_batches, args.grain_batches, args.sustained_batches = 20, 2, 20
    args.jpeg_size, args.jpeg_batch, args.jpeg_batches, args.image_size = (375, 500), 16, 5, 224
    if args.quick:
        args.num_examples, args.grain_examples, args.batch = 512, 256, 32
        args.workers, args.repeats, args.jpegs = [0, 1], 2, 8
        args.model, args.train_batch = "revnet_tiny", 16
        args.model_overrides = (("widths", (8, 8, 16)),)
        args.device_batches, args.grain_batches, args.sustained_batches = 4, 1, 2
        args.jpeg_size, args.jpeg_batch, args.jpeg_batches, args.image_size = (60, 80), 4, 1, 32
        args.max_sides, args.step_batch, args.step_workers = [48], 4, 0
        args.step_overrides = (("units_per_stage", (1, 1, 1, 1)), ("widths", (8, 8, 8, 8, 8)))
        args.dali_batch, args.dali_batches = 4, 1

    start = time.perf_counter()
    cifar = not args.imagenet_only
    inputs = input_only(args) if cifar else None
    imagenet_rows = (*imagenet_like(args), _dali_rate(args))
    image_steps = imagenet_steps(args)
    steps = train_steps(args) if cifar else None
    text = report(args, argv, inputs, imagenet_rows, steps, image_steps)
    out_dir = Path(args.out_dir)
    _report.write_report(out_dir, NAME, text)
    plot(out_dir / f"{NAME}.png", inputs, imagenet_rows, steps, image_steps,
         f"Input pipelines, {_report.hardware_label()}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return {"input": inputs, "imagenet": imagenet_rows[0], "imagenet_workers": imagenet_rows[1],
            "presizing": imagenet_rows[2], "dali": imagenet_rows[3],
            "imagenet_train": image_steps, "train": steps}


if __name__ == "__main__":
    main()

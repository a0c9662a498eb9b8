"""The devices `experiments.aot` compiles for (`Target`, `TARGETS`; multi-chip slices of them:
`Slice`, `SLICES`) and how table headers describe a compile for one (`describe`,
`lower_bound_note`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# No `import jax` here: the child process must set the target's environment first.

ROOT = Path(__file__).resolve().parents[2]
TARGETS_DIR = ROOT / "experiments" / "targets"
GiB = 2**30

# XLA flags of every compile for a GPU target. Without a device XLA's GEMM autotuner cannot time
# anything: every Triton GEMM fusion keeps one default tiling (16x8 output tiles), and the pass
# that hands such fusions to the generic Triton emitter (convert_triton_gemm_config) then fails
# on fusions no tiling of that size fits, with "INTERNAL: Couldn't find output tile sizes that
# satisfy hlo: dot ...". A ViT's attention output projection is one: with the heads-merge
# transpose fused into the GEMM its rows are batch x tokens, and 196 or 197 tokens (224x224,
# without or with a class token) split into no 8- or 16-row tiles. With Triton GEMMs off every
# dot is a cuBLAS call: one of the two kinds of GEMM a real GPU's autotuner chooses between, and
# the one left where no Triton tiling compiles. Where both compile, the compiled bytes differ by
# well under 1 % (ViT-S/16 and RevViT-S/16 at 32x32, batch 32: temporary bytes within 0.4 %).
GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)
# Flags added after the target's (later ones win), for experiments: the child does not inherit
# the parent's XLA_FLAGS.
XLA_FLAGS_VAR = "REVJAX_AOT_XLA_FLAGS"

_TPU_ENV = {
    # Deviceless: no metadata server, one fake host; silences libtpu's start-up warnings.
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    # Several compiles may run at once (tests, benchmarks): libtpu otherwise takes a lockfile.
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A device to compile for without having one.

    Attributes:
      name: the ``--target`` name.
      platform: ``"cuda"``, ``"tpu"`` or ``"cpu"``.
      description: the device, for table headers.
      memory_bytes: device memory the largest-batch search budgets against (``None``: unknown,
        the host CPU).
      memory_source: where ``memory_bytes`` comes from.
      config_file: GPU only, the ``GpuTargetConfig`` text proto under ``experiments/targets``.
      topology: TPU only, keyword arguments of `get_topology_desc`.
      env: environment the child needs before importing JAX.
      install: the pip requirement that provides the plugin.
    """

    name: str
    platform: str
    description: str
    memory_bytes: int | None
    memory_source: str
    config_file: str | None = None
    topology: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    install: str | None = None

    @property
    def memory_label(self) -> str:
        if self.memory_bytes is None:
            return "host memory"
        return f"{self.memory_bytes / GiB:.1f} GiB"


def _gpu_memory(config_file: str) -> int:
    """``device_memory_size`` of a GpuTargetConfig text proto (the single source of the figure)."""
    text = (TARGETS_DIR / config_file).read_text()
    match = re.search(r"^\s*device_memory_size:\s*(\d+)", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"{config_file}: no device_memory_size field")
    return int(match.group(1))


def _gpu(name: str, description: str, config_file: str) -> Target:
    return Target(
        name=name,
        platform="cuda",
        description=description,
        memory_bytes=_gpu_memory(config_file),
        memory_source=f"device_memory_size of experiments/targets/{config_file} (XLA's spec)",
        config_file=config_file,
        env={
            "CUDA_VISIBLE_DEVICES": "-1",
            "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
            "XLA_FLAGS": " ".join(GPU_XLA_FLAGS),
        },
        install="jax[cuda12]",
    )


def _tpu(
    name: str, description: str, topology: Mapping, accelerator: str, gib: int, source: str
) -> Target:
    return Target(
        name=name,
        platform="tpu",
        description=description,
        memory_bytes=gib * GiB,
        memory_source=source,
        topology=topology,
        env={**_TPU_ENV, "TPU_ACCELERATOR_TYPE": accelerator},
        install="jax[tpu]",
    )


_ONE_V5E = dict(
    topology_name="v5e:1x1",
    chip_config_name="default",
    chips_per_host_bounds=(1, 1, 1),
    num_slices=1,
    wrap=(False, False, False),
)
_MEGACORE_HOST = dict(
    chip_config_name="megacore",
    chips_per_host_bounds=(2, 2, 1),
    num_slices=1,
    wrap=(False, False, False),
)

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _gpu("h100", "NVIDIA H100 SXM 80 GB", "h100_sxm.txtpb"),
        _gpu("h200", "NVIDIA H200 141 GB", "h200.txtpb"),
        _gpu("a100-40", "NVIDIA A100 SXM4 40 GB", "a100_sxm_40.txtpb"),
        _gpu("a100-80", "NVIDIA A100 SXM4 80 GB", "a100_sxm_80.txtpb"),
        # One chip each. v4 and v5p chips are two TensorCores fused as one device ("megacore");
        # libtpu describes them only as a 2x2x1 host of 4 chips, of which one is compiled for.
        _tpu(
            "tpu-v5e",
            "TPU v5e (one chip)",
            _ONE_V5E,
            "v5litepod-1",
            16,
            "Cloud TPU docs: 16 GB HBM2 per v5e chip, taken as 16 GiB",
        ),
        _tpu(
            "tpu-v4",
            "TPU v4 (one chip, megacore)",
            {"topology_name": "v4:2x2x1", **_MEGACORE_HOST},
            "v4-8",
            32,
            "Cloud TPU docs: 32 GiB HBM2 per v4 chip",
        ),
        _tpu(
            "tpu-v5p",
            "TPU v5p (one chip, megacore)",
            {"topology_name": "v5:2x2x1", **_MEGACORE_HOST},
            "v5p-8",
            95,
            "Cloud TPU docs: 95 GB HBM2e per v5p chip, taken as 95 GiB",
        ),
        Target(
            name="cpu",
            platform="cpu",
            description="this host's CPU",
            memory_bytes=None,
            memory_source="-",
            env={"JAX_PLATFORMS": "cpu"},
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A multi-chip target: ``devices`` chips of a single-chip `Target` compiled for as one
    device mesh (`experiments.aot.mesh`). Platform, memory per device, environment and install
    are the chip's; only the topology describes the whole slice.

    Attributes:
      name: the ``--target`` name of `experiments.aot.mesh`.
      chip: the single-chip `Target` (one entry of `TARGETS`).
      description: the slice, for table headers.
      devices: chips in the slice (the mesh's size).
      topology: keyword arguments of `get_topology_desc` for the whole slice: TPU, the chip's
        with the slice's shape; GPU, ``{"topology": "1x1x8"}`` (partitions x hosts x devices
        per host).
      accelerator: TPU only, the slice's ``TPU_ACCELERATOR_TYPE``.
    """

    name: str
    chip: Target
    description: str
    devices: int
    topology: Mapping[str, Any]
    accelerator: str | None = None

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def env(self) -> dict[str, str]:
        """The chip's environment, with the slice's accelerator type."""
        env = dict(self.chip.env)
        if self.accelerator:
            env["TPU_ACCELERATOR_TYPE"] = self.accelerator
        return env


def _slice(name: str, chip: str, description: str, devices: int, accelerator: str | None = None,
           **topology: Any) -> Slice:
    """A `Slice` of ``devices`` chips of ``TARGETS[chip]``, its topology the chip's with
    ``topology``'s changes."""
    base = TARGETS[chip]
    return Slice(name, base, description, devices, {**base.topology, **topology}, accelerator)


SLICES: dict[str, Slice] = {
    s.name: s
    for s in (
        _slice("tpu-v5e-2x4", "tpu-v5e", "TPU v5e 2x4 slice (8 chips, one host)", 8,
               "v5litepod-8", topology_name="v5e:2x4", chips_per_host_bounds=(2, 4, 1)),
        # The single-chip v5p target already describes the 2x2x1 host; the slice uses all 4.
        _slice("tpu-v5p-8", "tpu-v5p", "TPU v5p-8 (4 megacore chips, one host)", 4, "v5p-8"),
        _slice("h100x8", "h100", "8x NVIDIA H100 SXM 80 GB (one node)", 8, topology="1x1x8"),
        # One chip through the mesh tool: the searches of the largest model / context / batch.
        _slice("h100x1", "h100", "one NVIDIA H100 SXM 80 GB", 1, topology="1x1x1"),
    )
}


def _named(table: Mapping[str, Any], name: str, kind: str, hint: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise SystemExit(
            f"unknown {kind} {name!r}; known {kind}s: {', '.join(table)} ({hint})"
        ) from None


def get_target(name: str) -> Target:
    """The `Target` called ``name``; a clear error naming the known ones otherwise."""
    return _named(TARGETS, name, "target", "python -m experiments.aot --list")


def get_slice(name: str) -> Slice:
    """The `Slice` called ``name``; a clear error naming the known ones otherwise."""
    return _named(SLICES, name, "multi-chip target", "single chips: python -m experiments.aot "
                  "--list")


def describe(target: Target, info: Mapping[str, Any]) -> str:
    """``"H100 ... (device kind ..., cuda plugin ...), compiled on <host>"`` for table headers."""
    versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    flags = f", XLA_FLAGS `{info['xla_flags']}`" if info.get("xla_flags") else ""
    return (
        f"target **{target.name}**: {target.description}, device kind "
        f"{info.get('device_kind', '?')!r}, {target.memory_label} ({versions}{flags}); compiled "
        f"ahead of time on a host without one ({info.get('host', '?')}), nothing run"
    )


LOWER_BOUND_NOTE = (
    "Compiled bytes are a lower bound of what the device needs: no autotuning without a device, "
    "so every cuDNN convolution gets a 0-byte workspace, and the CUDA context, library handles "
    "and allocator fragmentation are not counted."
)
_LOWER_BOUND_NOTES = {
    "cuda": LOWER_BOUND_NOTE,
    "tpu": (
        "Compiled bytes are a lower bound of what the chip needs: the program's code, what the "
        "TPU runtime reserves for itself and any fragmentation are not counted."
    ),
    "cpu": (
        "Compiled bytes are a lower bound of what this host's process needs (the cpu target "
        "tests the plumbing): the runtime's own allocations are not counted."
    ),
}


def lower_bound_note(target: Target) -> str:
    """What a table's compiled bytes leave out, for ``target``'s kind of device."""
    return _LOWER_BOUND_NOTES[target.platform]



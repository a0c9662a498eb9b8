"""The child side of a compile: the target's environment, then JAX; jobs from stdin, one JSON
record per line on stdout (`child_main`, run as `python -m experiments.aot --child TARGET`)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Mapping
from typing import Any

from experiments.aot.targets import TARGETS_DIR, Target, get_target

# JAX is imported inside the functions: `child_main` sets the target's environment first.


def _devices(target: Target):
    import jax
    from jax.experimental import topologies

    if target.platform == "cpu":
        return jax.devices("cpu")[:1]
    if target.platform == "cuda":
        config = (TARGETS_DIR / target.config_file).read_text()
        topo = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1")
    else:
        topo = topologies.get_topology_desc(platform="tpu", **target.topology)
    return list(topo.devices)[:1]


def _versions(target: Target) -> dict[str, str]:
    from importlib import metadata

    import jax

    versions = {"jax": jax.__version__}
    package = {"cuda": "jax-cuda12-plugin", "tpu": "libtpu"}.get(target.platform)
    if package:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _compile_one(spec: Mapping[str, Any], sharding, options, platform: str) -> dict:
    import revjax

    # Built and traced as for the target's platform: revjax's trace-time choices (default
    # unroll, fixed-point residual layout) follow it, not this process's default backend (CPU).
    with revjax.compiling_for(platform):
        return _build_and_compile(spec, sharding, options)


def _build_and_compile(spec: Mapping[str, Any], sharding, options) -> dict:
    import jax

    from experiments import _report
    from revjax.measure import compiled_memory

    start = time.perf_counter()
    step, state, batch = _report.abstract_train_step(
        spec["model"],
        spec["overrides"],
        batch_size=spec["batch"],
        image_size=spec["size"],
        in_channels=spec["in_channels"],
        num_classes=spec["num_classes"],
        donate=spec.get("donate", False),
        config=spec.get("config"),
    )
    params = _report.num_params(state)
    placed = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding, weak_type=s.weak_type),
        (state, batch),
    )
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered = step.lower(*placed)  # trace + lower
    lower_s = time.perf_counter() - start
    record = {
        "params": params,
        "build_s": build_s,
        "trace_lower_s": lower_s,
        # XLA's cost analysis of the unoptimised HLO: the program as JAX wrote it, the same for
        # every target (only a backend with a client computes it: not a deviceless GPU)
        "lowered_flops": _cost(lowered).get("flops"),
    }
    if not spec.get("compile", True):
        return record
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=spec.get("compiler_options") or options)
    record["compile_s"] = time.perf_counter() - start
    mem = compiled_memory(compiled)
    cost = _cost(compiled)
    return {
        **mem,
        "total": mem.total,
        # after the target's optimisations; None where the backend has no cost analysis
        "flops": cost.get("flops"),
        "bytes_accessed": cost.get("bytes accessed"),
        **record,
    }


def _cost(obj) -> dict:
    """``cost_analysis()`` as a dict, empty where the backend offers none."""
    try:
        cost = obj.cost_analysis()
    except Exception:  # noqa: BLE001 - e.g. no client for a compile-only platform
        return {}
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def child_main(name: str) -> None:
    """The child: target environment, then JAX; jobs from stdin, one JSON record per line."""
    target = get_target(name)
    for var, value in target.env.items():  # before JAX is imported (also when run by hand)
        os.environ.setdefault(var, value)
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = _devices(target)
    mesh = Mesh(np.array(devices), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec())
    info = {
        "target": target.name,
        "platform": devices[0].platform,
        "device_kind": getattr(devices[0], "device_kind", devices[0].platform),
        "default_backend": jax.default_backend(),
        "versions": _versions(target),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    print(json.dumps({"info": info}), flush=True)
    # The CPU target compiles only for memory and cost: LLVM's optimisation level does not change
    # buffer assignment, so level 0 gives the same bytes faster (see `_report`).
    options = {"xla_backend_optimization_level": 0} if target.platform == "cpu" else None
    for line in sys.stdin:  # one job per line, until the parent closes stdin
        if not line.strip():
            continue
        one = json.loads(line)
        try:
            record = _compile_one(one, sharding, options, target.platform)
        except Exception as error:  # noqa: BLE001 - reported to the parent, which decides
            record = {"error": f"{type(error).__name__}: {str(error)[:2000]}"}
        print(json.dumps({**one, **record}), flush=True)


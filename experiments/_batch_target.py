"""`bench_batch --target`: the largest batch that fits on a GPU/TPU this host does not have.

Nothing runs: the trainer's train step is compiled ahead of time for the target
(`experiments.aot`) at candidate batch sizes, and a batch fits when its compiled bytes
(arguments + outputs + temporaries - aliased, state donated) are within the target's memory minus
``--reserve`` (`experiments.aot.Budget`, the budget ``python -m experiments.aot --batch N`` judges
by). It reports the largest multiple of ``--multiple`` (8) that fits, confirmed by compiling it
and the next multiple, for the paper's presets (RevNet-38/110/164 vs ResNet-32/110/164 at 32x32,
RevNet-104 vs ResNet-101 at 224x224) or ``--models`` (``preset[:key=value,...]``), into
``bench_batch_<target>.md`` / ``.png``.
"""

from __future__ import annotations

import ast
import inspect
import math
from collections.abc import Callable
from pathlib import Path

from experiments import _report, aot
from revjax import presets
from revjax.measure import is_out_of_memory
from revjax.models import RevNet

NAME = "bench_batch"

# The paper's RevNets compared on a target, each with its ResNet twin from the preset registry
# (each at its preset's image side and classes: 32x32 / 10, ImageNet 224x224 / 1000).
TARGET_REVNETS = ("revnet38", "revnet110", "revnet164", "revnet104")
TARGET_MODELS = [m for rev in TARGET_REVNETS for m in (rev, presets.get(rev).twin)]


def largest_fitting_batch(
    total_of: Callable[[int], float],
    budget: float,
    *,
    start: int,
    multiple: int = 8,
    max_batch: int = 2**20,
    max_compiles: int = 12,
) -> tuple[int | None, int | None, list[tuple[int, float]]]:
    """The largest multiple of ``multiple`` whose compiled bytes fit in ``budget``.

    Compiled memory is close to affine in the batch (fixed state + bytes per image), so the
    search predicts instead of bisecting: from one point it scales proportionally (an
    under-estimate when the point fits, since the fixed part is ignored), from two or more it
    fits a line through the two points nearest the boundary, and it stops once a fitting batch
    and the next multiple, which does not fit, have both been compiled. Usually 3-4 compiles.
    Where the line moves the same end of the bracket twice in a row (memory far from affine,
    as on TPU), the next compile bisects the bracket.

    Args:
      total_of: compiled bytes at a batch size (``inf`` for a compile that runs out of memory).
      budget: bytes available.
      start: first batch to compile (rounded down to a multiple, at least ``multiple``).
      multiple: batch granularity.
      max_batch: never compile above this (the result is then a lower bound).
      max_compiles: give up after this many compiles (the bracket found so far is returned).

    Returns:
      ``(largest, first_failure, tries)``: the largest fitting multiple (``None`` if ``multiple``
      itself does not fit), the smallest failing one compiled (``None`` if the cap was reached),
      and every ``(batch, bytes)`` compiled, in order.
    """
    g = int(multiple)
    down = lambda b: max(g, int(b) // g * g)
    tries: list[tuple[int, float]] = []
    points: dict[int, float] = {}
    lo = hi = None  # largest fitting, smallest failing

    sides: list[bool] = []  # fits?, for each compile made once the boundary was bracketed

    def measure(b: int) -> None:
        nonlocal lo, hi
        total = float(total_of(b))
        tries.append((b, total))
        points[b] = total
        if lo is not None and hi is not None:
            sides.append(total <= budget)
        if total <= budget:
            lo = b if lo is None else max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)

    measure(min(down(start), down(max_batch)))
    while len(tries) < max_compiles:
        if hi is not None and (hi == g if lo is None else hi - lo <= g):
            break
        finite = sorted((b, t) for b, t in points.items() if math.isfinite(t))
        if hi is not None and math.isinf(points[hi]) and not any(t > budget for _, t in finite):
            # the only failures ran out of memory while compiling (no bytes known above the
            # boundary): bisect, in log space, between the last fit and the first failure
            pred = math.sqrt((lo or 1) * hi)
        elif len(finite) >= 2:
            # the two points nearest the boundary: the largest fitting and smallest failing, or
            # the last two on one side
            below = [p for p in finite if p[1] <= budget]
            above = [p for p in finite if p[1] > budget]
            pair = (below[-1:] + above[:1]) if below and above else (below or above)[-2:]
            if len(pair) < 2:
                pair = finite[-2:]
            (b1, t1), (b2, t2) = pair
            slope = (t2 - t1) / (b2 - b1)
            pred = b1 + (budget - t1) / slope if slope > 0 else 2 * max(points)
        elif finite:
            b1, t1 = finite[0]
            pred = b1 * budget / t1
        else:  # only out-of-memory compiles so far
            pred = min(points) / 2
        if lo is not None and hi is not None and len(sides) >= 2 and sides[-1] == sides[-2]:
            # The line moved the same end twice: memory is far from affine here (TPU compiles,
            # XLA:GPU rematerialising near the limit), so bisect instead.
            pred = (lo + hi) / 2
        cand = down(pred)
        if lo is not None:
            cand = max(cand, lo + g)
        if hi is not None:
            cand = min(cand, hi - g)
        if cand in points:  # the prediction lands on a compiled batch: step off it
            cand = cand + g if points[cand] <= budget else cand - g
        if cand > max_batch:  # compile the cap itself once: the result is then a lower bound
            cand = down(max_batch)
        if cand < g or cand in points:
            break
        measure(cand)
    return lo, hi, tries


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"revnet164:remat_transitions=True,exact_every=None"`` -> preset and overrides (values
    are Python literals; anything else is a string)."""
    preset, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"{NAME}: model spec {spec!r}: expected key=value, got {item!r}")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    return preset, overrides


def default_target_models() -> list[str]:
    """The paper's presets (`TARGET_MODELS`), plus RevNet-164 / RevNet-104 with the transition
    setting that is not the default, and with invertible downsampling where the installed RevNet
    has it."""
    params = inspect.signature(RevNet.__init__).parameters
    other = not params["remat_transitions"].default
    extra = [f"revnet164:remat_transitions={other}", f"revnet104:remat_transitions={other}"]
    if "downsample" in params:
        extra.append("revnet164:downsample=invertible")
    return list(TARGET_MODELS) + extra


def line_near_budget(tries, budget: float, multiple: int) -> tuple[float | None, int | None]:
    """Bytes per image and the largest multiple within ``budget`` on the line through the two
    compiled batches nearest the budget; ``(None, None)`` when fewer than two compiled or when
    that line does not rise (TPU memory is not monotone in the batch: two batches can compile to
    the same bytes, or the larger to fewer), since such a slope predicts nothing."""
    finite = [(b, t) for b, t in tries if math.isfinite(t)]
    if len(finite) < 2:
        return None, None
    (b1, t1), (b2, t2) = sorted(finite, key=lambda p: (abs(p[1] - budget), p[0]))[:2]
    per_image = (t2 - t1) / (b2 - b1)
    if per_image <= 0:
        return None, None
    return per_image, int(b1 + (budget - t1) / per_image) // multiple * multiple


def _simulate_model(compiler, spec: str, budget: aot.Budget, args, start_for: Callable) -> dict:
    model, overrides = parse_model_spec(spec)
    try:
        preset = presets.get(model)
    except ValueError as error:
        raise SystemExit(f"{NAME}: {error}") from None
    size, classes = args.size or preset.image_size, preset.num_classes
    records = {}

    def total_of(batch: int) -> float:
        spec = aot.job(
            model, {**overrides, "unroll": 1}, batch=batch, size=size, num_classes=classes
        )
        spec["donate"] = True  # as the training loop: old and new state share buffers
        r = compiler.compile(spec)
        if "error" in r:
            if not is_out_of_memory(r["error"]):
                raise SystemExit(f"{NAME}: compiling {model} at batch {batch} failed: {r['error']}")
            r["total"] = math.inf
        records[batch] = r
        fits = budget.verdict(r["total"])
        how = "from the cache" if r.get("cached") else f"compile {r.get('compile_s', 0):.0f} s"
        print(
            f"  {model} {size}x{size}: batch {batch}: {r['total'] / 2**30:.2f} GiB ({fits}; {how})",
            flush=True,
        )
        return r["total"]

    start = start_for(args.start, spec) or (128 if size <= 64 else 32)
    largest, failed, tries = largest_fitting_batch(
        total_of,
        budget.bytes,
        start=start,
        multiple=args.multiple,
        max_batch=args.max_batch,
        max_compiles=args.max_compiles,
    )
    per_image, predicted = line_near_budget(tries, budget.bytes, args.multiple)
    params = next(iter(records.values())).get("params")
    return {
        "model": spec,
        "predicted": predicted,
        "size": size,
        "params": params,
        "largest": largest,
        "first_failure": failed,
        "tries": tries,
        "records": records,
        "bytes_per_image": per_image,
    }


def simulate_on_target(
    args, start_for: Callable, on_row=None
) -> tuple[dict, list[dict], aot.Budget]:
    """Largest batch of every model, compiled for ``args.target`` (``args.processes`` child
    processes); ``on_row(info, rows_so_far, budget)`` after each model (partial tables)."""
    target = aot.get_target(args.target)
    budget = aot.budget_for(target, reserve=args.reserve, memory_gib=args.memory_gib)
    if budget is None:
        raise SystemExit(
            f"{NAME}: target {target.name!r} has no device memory to budget against; pick a "
            f"GPU/TPU target ({', '.join(t for t in aot.TARGETS if t != 'cpu')}) or pass "
            "--memory-gib"
        )
    info, rows = aot.share_out(  # one child process per thread; models shared out
        target,
        args.models or default_target_models(),
        lambda compiler, spec: _simulate_model(compiler, spec, budget, args, start_for),
        processes=args.processes,
        python=args.aot_python,
        cache=args.cache,
        on_result=None if on_row is None else lambda info, _, rows: on_row(info, rows, budget),
    )
    return info, rows, budget


def to_markdown_target(
    rows: list[dict],
    head: str,
    budget: float,
    multiple: int,
    max_compiles: int,
    target: aot.Target,
) -> str:
    columns = [
        "model",
        "image",
        "params",
        f"largest batch (multiple of {multiple}) that fits",
        "smallest batch compiled that does not fit",
        "compiled GiB at largest",
        "temp GiB at largest",
        "MiB per image",
        "line's prediction",
        "batches compiled (GiB)",
    ]
    table = []
    for r in rows:
        best = r["largest"]
        rec = r["records"].get(best, {}) if best else {}
        fail = r["first_failure"]
        table.append(
            [
                r["model"],
                f"{r['size']}x{r['size']}",
                f"{r['params']:,}" if r["params"] else "-",
                "-" if best is None else f"{best:,}",
                "none compiled" if fail is None else f"{fail:,}",
                "-" if not rec else f"{rec['total'] / 2**30:.2f}",
                "-" if not rec else f"{rec['temp'] / 2**30:.2f}",
                "-" if r["bytes_per_image"] is None else f"{r['bytes_per_image'] / 2**20:.2f}",
                "-" if r["predicted"] is None else f"{r['predicted']:,}",
                ", ".join(
                    f"{b:,} ({t / 2**30:.1f})" if math.isfinite(t) else f"{b:,} (OOM)"
                    for b, t in r["tries"]
                ),
            ]
        )
    by_model = {r["model"]: r for r in rows}
    ratios = []
    twins = presets.twins()
    for a in rows:
        b = by_model.get(twins.get(a["model"].split(":")[0], ""))
        if b and a["largest"] and b["largest"]:
            capped = any(
                r["first_failure"] is None or r["first_failure"] - r["largest"] > multiple
                for r in (a, b)
            )
            ratios.append(
                [
                    f"{a['model']} / {b['model']}",
                    f"{a['size']}x{a['size']}",
                    f"{a['largest']:,} / {b['largest']:,}",
                    f"{a['largest'] / b['largest']:.1f}x"
                    + (" (bracket not closed: see the line's prediction)" if capped else ""),
                ]
            )
    lines = [head, "", _report.markdown_table(columns, table), ""]
    if ratios:
        lines += [
            _report.markdown_table(["pair", "image", "largest batch", "RevNet / ResNet"], ratios),
            "",
        ]
    lines += [
        f"Fits: compiled arguments + outputs + temporaries - aliased (the state is donated, as "
        f"in the training loop) <= {budget / 2**30:.2f} GiB. Search: compile a first batch "
        "(`--start`, else 128 at 32x32 and 32 at 224x224), scale it to the budget, then "
        "follow the line through "
        "the two compiles nearest the budget until a batch that fits and the next multiple, "
        f"which does not, have both been compiled (at most {max_compiles} compiles per "
        "model; where that cap stopped the search, the next multiple is not confirmed). "
        "MiB per image: that line's slope; line's prediction: the largest multiple it puts "
        "within the budget ('-' for both where the two compiles nearest the budget do not "
        "rise with the batch, as happens on TPUs). Targets "
        "(H100): RevNet-164 >= 10x ResNet-164, RevNet-104 >= 4x ResNet-101.",
        "",
        aot.lower_bound_note(target),
    ]
    return "\n".join(lines)


def plot_target(rows: list[dict], path: Path, title: str, budget: float) -> Path:
    """Compiled GiB of every batch compiled, per model, against the budget (log batch axis)."""
    series = {}
    for r in rows:
        pts = sorted((b, t) for b, t in r["tries"] if math.isfinite(t))
        label = f"{r['model']} ({r['size']}x{r['size']})"
        series[label] = ([b for b, _ in pts], [t / 2**30 for _, t in pts])
    xs = sorted({b for bs, _ in series.values() for b in bs})
    if xs:
        series["budget"] = ([xs[0], xs[-1]], [budget / 2**30] * 2)
    return _report.plot_lines(
        path, series, title=title, xlabel="batch size", ylabel="compiled GiB", logx=True
    )


def run(args, *, command: str, start_for: Callable) -> list[dict]:
    """The search compiled for ``args.target``; writes the table and plot after every model.

    Args:
      args: `experiments.bench_batch`'s parsed options.
      command: the command line, for the table's header.
      start_for: ``start_for(args.start, spec)``, the ``--start`` batch for one model spec or
        ``None``.
    """
    target = aot.get_target(args.target)
    args.max_batch = args.max_batch or 2**20
    if args.quick:
        raise SystemExit(f"{NAME}: --quick has no meaning with --target; use --models")

    def report(info, rows, budget, final=False):
        done = "" if final else f" (partial: {len(rows)} models so far)"
        details = (
            "largest batch that fits, simulated: the trainer's train step (SGD + momentum, "
            "state donated), rolled scans (unroll=1), float32, compiled for the target at "
            f"candidate batch sizes; {budget.describe()}{done}"
        )
        head = _report.target_header("Largest batch", details, command, aot.describe(target, info))
        name = f"{NAME}_{target.name}"
        _report.write_report(
            args.out_dir,
            name,
            to_markdown_target(rows, head, budget.bytes, args.multiple, args.max_compiles, target),
        )
        png = plot_target(
            rows,
            args.out_dir / f"{name}.png",
            f"Compiled train-step memory vs batch, {target.description}",
            budget.bytes,
        )
        print(f"wrote {png}")

    info, rows, budget = simulate_on_target(args, start_for, on_row=report)
    report(info, rows, budget, final=True)
    return rows

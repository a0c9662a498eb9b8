"""Is the backward's rebuild of F and G the forward's computation? Compiled HLO, per target.

Compiles the gradient of a fixed-point `revjax.ReversibleSequence` (``rebuild="isolated"``,
rolled: ``unroll=1``, as GPUs and TPUs run it) for a GPU or TPU target without the device
(deviceless ahead-of-time compilation, as ``experiments.aot``, traced inside
`revjax.compiling_for` the target's platform), for a conv unit (F = G = conv + BatchNorm +
ReLU + conv, bfloat16 compute) and a transformer unit (F = LayerNorm + attention, G = LayerNorm
+ exact-GELU MLP, float32 and bfloat16 compute). In the optimised HLO an isolated branch
evaluation is, on CPU, a ``conditional`` whose true branch computation is the F or G
evaluation, and on GPU and TPU the instructions between two ``opt-barrier``s: those the output
barrier's int32 rounded output depends on, back to the input barrier. The script prints, per
case, each while-loop body's isolated branches as op sequences (opcodes, fusion kinds and the
fused computations' ops, custom-call targets, shapes; names stripped; only what the int32
rounded output depends on) and whether the forward loop's and the backward loop's are
identical.

Run it with the target's interpreter (it needs the CUDA or TPU plugin)::

    PYTHONPATH=. .venv-aot-cuda/bin/python -m experiments.exact_hlo --target h100
    PYTHONPATH=. .venv-aot-tpu/bin/python -m experiments.exact_hlo --target tpu-v5e

``--target cpu`` compiles for this host (no plugin needed; the tests' smoke run). Writes
``<out-dir>/exact_hlo_<target>.md``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.aot.targets import TARGETS as AOT_TARGETS

# No `import jax` at module level: a GPU/TPU target's environment must be set first (`main`).
TARGETS = ("h100", "tpu-v5e", "cpu")


def _devices(target: str):
    from experiments.aot.child import _devices as target_devices

    return target_devices(AOT_TARGETS[target])


def compiled_text(kind: str, dtype: str, target: str, units: int = 4) -> str:
    """Optimised HLO of one jitted gradient of a fixed-point sequence, compiled for ``target``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import revjax
    from experiments.bench_arithmetic import _branches

    width = 64
    make_f, make_g = _branches(kind, jnp.dtype(dtype), width)
    seq = revjax.ReversibleSequence(
        make_f, make_g, units, rngs=nnx.Rngs(0), arithmetic="fixed", unroll=1
    )
    graphdef, params, rest = nnx.split(seq, nnx.Param, ...)
    shape = (32, 16, 16, width) if kind == "conv" else (8, 128, width)

    def grad(params, rest, x1, x2):
        def loss(params):
            y1, y2 = nnx.merge(graphdef, params, rest, copy=True)(x1, x2)
            return jnp.sum(y1 * jnp.cos(y2))

        return jax.grad(loss)(params)

    mesh = Mesh(_devices(target), ("d",))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)
    half = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated)
    args = (jax.tree.map(abstract, params), jax.tree.map(abstract, rest), half, half)
    with jax.numpy_dtype_promotion("standard"), revjax.compiling_for(AOT_TARGETS[target].platform):
        text = jax.jit(grad).lower(*args).compile().as_text()
    platform = AOT_TARGETS[target].platform
    dumped = {"cuda": _before_barrier_expansion, "tpu": _last_with_barriers}.get(platform)
    dumped = dumped() if dumped is not None else None
    return dumped if dumped is not None else text


# XLA:GPU keeps optimisation barriers through fusion and scheduling and removes them just
# before rematerialisation: the module as it enters that pass is the fused, scheduled program
# with its barriers, dumped there (`DUMP_FLAGS`, set before JAX starts).
DUMP_DIR = Path(os.environ.get("REVJAX_EXACT_HLO_DUMP", "/tmp/revjax_exact_hlo_dump"))
DUMP_FLAGS = f"--xla_dump_to={DUMP_DIR} --xla_dump_hlo_pass_re=^rematerialization$"


def _before_barrier_expansion() -> str | None:
    """The newest dumped module entering XLA:GPU's rematerialisation pass, then deletes the
    dumps; None when there is none (CPU and TPU compiles)."""
    files = sorted(DUMP_DIR.glob("*jit_grad*before_rematerialization.txt"),
                   key=lambda f: f.stat().st_mtime)  # fmt: skip
    if not files:
        return None
    text = files[-1].read_text()
    shutil.rmtree(DUMP_DIR, ignore_errors=True)
    return text


# libtpu's final program has neither barriers nor conditionals left, and which of its passes
# removes the barriers is not named: every pass's output is dumped (`TPU_DUMP_FLAGS`, through
# XLA_FLAGS) and the last module that still has its barriers is read.
TPU_DUMP_FLAGS = f"--xla_dump_to={DUMP_DIR} --xla_dump_hlo_pass_re=.*"


def _last_with_barriers() -> str | None:
    """The last dumped module (in pass order) of the gradient that still holds ``opt-barrier``
    instructions, then deletes the dumps; None when there is none."""
    # Dump names: module_<id>.jit_grad.cl_<n>.<pass number>.<pipeline>.after_<pass>...: in pass
    # order (the unnumbered before_ / after_optimizations files are left out). In libtpu 0.0.42
    # the last one with barriers enters `cse_barrier_expander` (final rematerialisation).
    numbered = (
        re.search(r"\.jit_grad\.(?:cl_\d+\.)?(\d+)\.", f.name) for f in DUMP_DIR.glob("*.txt")
    )
    files = sorted((int(m.group(1)), m.string) for m in numbered if m)
    found = None
    for _, name in reversed(files):
        text = (DUMP_DIR / name).read_text()
        if "opt-barrier(" in text and "ENTRY" in text:
            found = text
            break
    shutil.rmtree(DUMP_DIR, ignore_errors=True)
    return found


# ---------------------------------------------------------------------------------------------
# Reading optimised HLO text
# ---------------------------------------------------------------------------------------------

Instr = collections.namedtuple("Instr", "name shape opcode operands attrs")


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse(text: str) -> dict[str, list[Instr]]:
    """Computations of an HLO module: name -> instructions in text order."""
    comps, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and " = " not in line:
            current = comps.setdefault(head.group(1), [])
            continue
        if current is None or " = " not in line:
            continue
        lhs, rhs = line.split(" = ", 1)
        name = lhs.replace("ROOT", "").strip().lstrip("%")
        if rhs.startswith("("):
            end = _balanced(rhs, 0)
            shape, rest = rhs[:end], rhs[end:].lstrip()
        else:
            shape, _, rest = rhs.partition(" ")
        m = re.match(r"([\w\-]+)\(", rest)
        if not m:
            continue
        opcode = m.group(1)
        end = _balanced(rest, m.end() - 1)
        operands = [p.split()[-1].lstrip("%") for p in _split_top(rest[m.end() : end - 1])]
        current.append(Instr(name, re.sub(r"\{[^}]*\}", "", shape), opcode, operands,
                             rest[end:]))  # fmt: skip
    return comps


def _attr(instr: Instr, key: str) -> str | None:
    m = re.search(key + r"=%?([\w.\-]+|\"[^\"]*\")", instr.attrs)
    return m.group(1) if m else None


def describe(instr: Instr, comps: dict[str, list[Instr]]) -> str:
    """An instruction without names: opcode, shape and, for fusions, the fused ops."""
    out = f"{instr.opcode} {instr.shape}"
    if instr.opcode == "fusion":
        fused = comps.get(_attr(instr, "calls") or "", [])
        ops = " ".join(i.opcode for i in fused if i.opcode != "parameter")
        out += f" [{_attr(instr, 'kind')}: {ops}]"
    elif instr.opcode == "custom-call":
        out += f" [{_attr(instr, 'custom_call_target')}]"
    return out


def _rounded_output_cone(body: list[Instr]) -> list[Instr]:
    """The instructions of a branch computation that its first output (the int32 rounded
    output) depends on, in text order: what must be the same computation for the same bits.
    The rest (aux such as BatchNorm running averages, and max |h|) may move in or out of the
    branch (XLA's conditional code motion) without changing them."""
    if not body:
        return []
    by_name = {i.name: i for i in body}
    root = body[-1]
    todo = [root.operands[0]] if root.opcode == "tuple" and root.operands else [root.name]
    cone = set()
    while todo:
        name = todo.pop()
        if name in cone or name not in by_name:
            continue
        cone.add(name)
        todo.extend(by_name[name].operands)
    skip = ("parameter", "get-tuple-element", "constant", "tuple")
    return [i for i in body if i.name in cone and i.opcode not in skip]


def branches(comp: list[Instr], comps) -> list[list[str]]:
    """Each isolated branch evaluation of a computation (a ``conditional`` whose true branch is
    the F or G evaluation): that branch computation's instructions, described."""
    found = []
    for instr in comp:
        if instr.opcode != "conditional":
            continue
        m = re.search(r"branch_computations=\{([^}]*)\}", instr.attrs)
        names = [n.strip().lstrip("%") for n in m.group(1).split(",")] if m else []
        if not names:  # the older true_computation= / false_computation= spelling
            names = [_attr(instr, k) or "" for k in ("true_computation", "false_computation")]
        body = max((comps.get(n, []) for n in names), key=len)
        found.append([describe(i, comps) for i in _rounded_output_cone(body)])
    return found


def _barrier_cone(by_name: dict[str, Instr], start: str, skip: set[str]) -> set[str]:
    """Names ``start`` depends on within one computation, not crossing an ``opt-barrier``."""
    cone, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in cone or name not in by_name:
            continue
        instr = by_name[name]
        if instr.opcode in ("opt-barrier", "parameter") or name in skip:
            continue
        cone.add(name)
        todo.extend(instr.operands)
    return cone


def barrier_branches(comp: list[Instr], comps) -> list[list[str]]:
    """Each isolated branch evaluation between optimisation barriers (GPU, TPU): for every
    ``opt-barrier`` whose first operand is int32, the instructions that operand depends on back
    to the previous barriers, described; kept where they hold a dot, convolution or custom call
    (an F or G evaluation, not the backward's barriers around bookkeeping)."""
    by_name = {i.name: i for i in comp}
    # Reading a barrier's result is reading its input: stop there too.
    from_barrier = {
        i.name for i in comp
        if i.opcode == "get-tuple-element" and by_name.get(i.operands[0], i).opcode == "opt-barrier"
    }  # fmt: skip
    found = []
    for instr in comp:
        if instr.opcode != "opt-barrier" or not instr.operands:
            continue
        packed = by_name.get(instr.operands[0])
        first = packed.operands[0] if packed is not None and packed.opcode == "tuple" else None
        if first is None or not by_name.get(first, packed).shape.startswith("s32"):
            continue
        cone = _barrier_cone(by_name, first, from_barrier)
        skip = ("parameter", "get-tuple-element", "constant", "tuple")
        ops = [describe(i, comps) for i in comp if i.name in cone and i.opcode not in skip]
        if any(re.search(r"convolution|dot|custom-call", op) for op in ops):
            found.append(ops)
    return found


def analyse(text: str) -> list[tuple[str, list[list[str]]]]:
    """``(computation, its isolated branches)`` for every computation that has any
    (conditionals on CPU, barrier-delimited regions on GPU and TPU)."""
    comps = parse(text)
    out = []
    for name, comp in comps.items():
        found = branches(comp, comps) or barrier_branches(comp, comps)
        if found:
            out.append((name, found))
    return out


def digest(ops: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ops).encode()).hexdigest()[:10]


def report(target: str, cases: Sequence[tuple[str, str]], argv: Sequence[str]) -> str:
    from experiments import _report  # imports jax: after the target's environment is set

    label = {"cpu": "CPU"}.get(target, target)
    where = (
        "a `conditional`'s branch computation"
        if target == "cpu"
        else "the instructions between two `opt-barrier`s; on GPU in the module as it enters "
        "XLA's rematerialisation pass, fused and scheduled, just before the barriers are removed"
        if AOT_TARGETS[target].platform == "cuda"
        else "the instructions between two `opt-barrier`s; on TPU in the last module of "
        "libtpu's pass pipeline that still holds them (as it enters the barrier expander of its "
        "final rematerialisation, fused and scheduled)"
    )
    lines = [
        _report.header(
            f"Isolated F/G in the compiled forward and backward, {label} target",
            "op sequences of the forward's and the backward's isolated branches",
            _report.command_line("experiments.exact_hlo", argv),
        ),
        "",
        "Gradient of a fixed-point `ReversibleSequence` of 4 units (width 64; conv: batch 32, "
        "16x16; transformer: batch 8, 128 tokens, 4 heads), `unroll=1`. Per while-loop body "
        f"holding isolated branch evaluations ({where}): each branch's op sequence digest and "
        "length "
        "(opcodes, shapes, fusion kinds with their fused ops, custom-call targets; names "
        "stripped; the instructions the int32 rounded output depends on). `same`: the forward "
        "loop's branches and the backward loop's are the same "
        "op sequences (as multisets).",
        "",
    ]
    for kind, dtype in cases:
        found = analyse(compiled_text(kind, dtype, target))
        lines += [f"## {kind}, {dtype} compute", ""]
        sigs = []
        for name, regions in found:
            sig = sorted(digest(r) for r in regions)
            sigs.append(sig)
            listed = ", ".join(f"{digest(r)} ({len(r)} ops)" for r in regions)
            lines.append(f"- `{name}`: {listed}")
        loops = [s for s in sigs if len(s) >= 2]
        same = len(loops) >= 2 and all(s == loops[0] for s in loops)
        lines += ["", f"same: **{'yes' if same else 'no'}** ({len(loops)} loop bodies)", ""]
        if found:
            first = found[0][1]
            for r in first:
                lines += [f"<details><summary>{digest(r)}</summary>", "", "```"]
                lines += r + ["```", "", "</details>", ""]
        print(f"  {kind} {dtype}: same={same} {sigs}", flush=True)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=TARGETS, default="h100")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    cases = [("conv", "bfloat16"), ("transformer", "float32"), ("transformer", "bfloat16")]
    text = report(args.target, cases, argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"exact_hlo_{args.target}.md").write_text(text)


if __name__ == "__main__":
    if "--target" in sys.argv[:-1]:
        name = sys.argv[sys.argv.index("--target") + 1]
        for var, value in getattr(AOT_TARGETS.get(name), "env", {}).items():
            os.environ.setdefault(var, value)  # before JAX is imported
        platform = getattr(AOT_TARGETS.get(name), "platform", "")
        if platform == "cuda":
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DUMP_FLAGS}"
        elif platform == "tpu":  # compile options from XLA_FLAGS reach libtpu's compiler
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TPU_DUMP_FLAGS}"
    main()

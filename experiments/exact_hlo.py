"""Is the backward's rebuild of F and G the forward's computation? Compiled HLO, per target.

Compiles the gradient of a fixed-point `revjax.ReversibleSequence` (rolled: ``unroll=1``, as
GPUs and TPUs run it) for a GPU or TPU target without the device (deviceless ahead-of-time
compilation, as ``experiments.aot``, traced inside `revjax.compiling_for` the target's
platform), for a conv unit (F = G = conv + BatchNorm + ReLU + conv, bfloat16 compute) and a
transformer unit (F = LayerNorm + attention, G = LayerNorm + exact-GELU MLP, float32 and
bfloat16 compute), in both rebuild modes:

- ``rebuild="isolated"``: an isolated branch evaluation is, on CPU, a ``conditional`` whose
  true branch computation is the F or G evaluation, and on GPU and TPU the instructions
  between two ``opt-barrier``s that the output barrier's int32 rounded output depends on.
- ``rebuild="pullback"``: no barriers; in the final program, the computation each rounding to
  the grid depends on (`rounding_cones`): F and G in the forward loop, the pullback's
  recomputation (from which the rebuild is taken) in the backward loop.

It prints, per case, each while-loop body's evaluations as op sequences (opcodes, fusion kinds
and the fused ops, custom-call targets, shapes; names stripped) and whether the forward loop's
and the backward loop's are identical. Run it with the target's interpreter (it needs the CUDA
or TPU plugin)::

    PYTHONPATH=. .venv-aot-cuda/bin/python -m experiments.exact_hlo --target h100
    PYTHONPATH=. .venv-aot-tpu/bin/python -m experiments.exact_hlo --target tpu-v5e

``--target cpu`` compiles for this host (no plugin needed); ``--rebuild`` picks the modes.
Writes ``<out-dir>/exact_hlo_<target>.md``.
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


def compiled_text(
    kind: str, dtype: str, target: str, units: int = 4, rebuild: str = "isolated"
) -> str:
    """Optimised HLO of one jitted gradient of a fixed-point sequence, compiled for ``target``:
    with ``rebuild="isolated"`` the module the isolated branches are read from (see
    `_before_barrier_expansion`, `_last_with_barriers`), with ``"pullback"`` the final program.
    The gradient includes the `revjax.RebuildMismatches` count, as a training step's does, so
    the rebuild checksums are part of the program, and returns the updated non-parameter state
    (BatchNorm statistics), as a training step does."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import revjax
    from experiments.bench_arithmetic import _branches

    width = 64
    make_f, make_g = _branches(kind, jnp.dtype(dtype), width)
    seq = revjax.ReversibleSequence(
        make_f, make_g, units, rngs=nnx.Rngs(0), arithmetic="fixed", unroll=1, rebuild=rebuild
    )
    graphdef, params, rest = nnx.split(seq, nnx.Any(nnx.Param, revjax.RebuildMismatches), ...)
    shape = (32, 16, 16, width) if kind == "conv" else (8, 128, width)

    def grad(params, rest, x1, x2):
        def loss(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            y1, y2 = model(x1, x2)
            # The updated rest (BatchNorm statistics) is an output, as in a training step:
            # left unused, XLA drops the forward's running-average update, which the backward's
            # rebuild keeps (`rebuilt_output`), and the two loops' evaluations would differ by it.
            rest_after = nnx.split(model, nnx.Any(nnx.Param, revjax.RebuildMismatches), ...)[2]
            return jnp.sum(y1 * jnp.cos(y2)), rest_after

        return jax.grad(loss, has_aux=True)(params)

    mesh = Mesh(_devices(target), ("d",))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)
    half = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated)
    args = (jax.tree.map(abstract, params), jax.tree.map(abstract, rest), half, half)
    with jax.numpy_dtype_promotion("standard"), revjax.compiling_for(AOT_TARGETS[target].platform):
        text = jax.jit(grad).lower(*args).compile().as_text()
    platform = AOT_TARGETS[target].platform
    dumped = {"cuda": _before_barrier_expansion, "tpu": _last_with_barriers}.get(platform)
    if rebuild == "pullback" or dumped is None:
        shutil.rmtree(DUMP_DIR, ignore_errors=True)
        return text
    dumped = dumped()
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
    comps, current, roots = {}, None, {}
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
        args = re.sub(r"/\*.*?\*/", "", rest[m.end() : end - 1])  # /*index=5*/ comments
        operands = [p.split()[-1].lstrip("%") for p in _split_top(args)]
        instr = Instr(name, re.sub(r"\{[^}]*\}", "", shape), opcode, operands, rest[end:])
        roots[id(current)] = instr if lhs.lstrip().startswith("ROOT") else roots.get(id(current))
        current.append(instr)
    for body in comps.values():  # the root last, as `_rounded_output_cone` reads it
        root = roots.get(id(body))
        if root is not None and body[-1] is not root:
            body.remove(root)
            body.append(root)
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


# ---------------------------------------------------------------------------------------------
# rebuild="pullback": the roundings' dependency cones in the final program
# ---------------------------------------------------------------------------------------------


class Flat:
    """A computation's dataflow with its fusions opened.

    A node is ``(path, name)``: ``path`` the fusion instructions entered from the top
    computation, ``name`` an instruction of the computation there. A fused computation's
    parameter is its fusion's operand, and a tuple element taken from a fusion is the operand
    of the fused root tuple: `value` follows both.
    """

    def __init__(self, comps: dict[str, list[Instr]], top: str):
        self.comps, self.top, self._tables = comps, top, {}

    def table(self, path: tuple) -> dict[str, Instr]:
        if path not in self._tables:
            if path:
                fusion = self.table(path[:-1])[path[-1]]
                body = self.comps.get(_attr(fusion, "calls") or "", [])
            else:
                body = self.comps[self.top]
            self._tables[path] = {i.name: i for i in body}
        return self._tables[path]

    def instr(self, node) -> Instr:
        return self.table(node[0])[node[1]]

    def value(self, path: tuple, name: str):
        """The node that computes ``name`` (in the computation at ``path``); None if unknown."""
        instr = self.table(path).get(name)
        if instr is None:
            return None
        if instr.opcode == "parameter" and path:
            fusion = self.table(path[:-1])[path[-1]]
            return self.value(path[:-1], fusion.operands[int(instr.operands[0])])
        if instr.opcode == "fusion":
            body = self.comps.get(_attr(instr, "calls") or "", [])
            return self.value(path + (name,), body[-1].name) if body else (path, name)
        if instr.opcode == "get-tuple-element":
            src = self.value(path, instr.operands[0])
            if src is not None and self.instr(src).opcode == "tuple":
                index = int(re.search(r"index=(\d+)", instr.attrs).group(1))
                return self.value(src[0], self.instr(src).operands[index])
        return (path, name)

    def operands(self, node) -> list:
        return [self.value(node[0], op) for op in self.instr(node).operands]

    def nodes(self, path: tuple = ()):
        """Every node in text order, each fusion opened where it stands."""
        for instr in self.table(path).values():
            if instr.opcode == "fusion":
                yield from self.nodes(path + (instr.name,))
            elif not path or instr.opcode not in ("parameter", "tuple", "get-tuple-element"):
                yield (path, instr.name)

    def kinds(self, path: tuple) -> str:
        """The fusion kinds along ``path``, outermost first (``kOutput>kLoop``)."""
        return ">".join(
            _attr(self.table(path[:i])[path[i]], "kind") or "?" for i in range(len(path))
        )


def _cone(flat: Flat, root) -> set:
    """The nodes ``root`` depends on, not crossing integer values (the int32 carries a branch
    reads, loop indices) nor the loop's parameters (an element of one included)."""
    cone, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in cone:
            continue
        instr = flat.instr(node)
        boundary = instr.shape.startswith(("s32", "u32")) or instr.opcode == "parameter"
        if instr.opcode == "get-tuple-element":  # of a custom call's or a loop's result
            source = flat.operands(node)[0]
            boundary = boundary or source is None or flat.instr(source).opcode == "parameter"
        if node != root and boundary:
            continue
        cone.add(node)
        todo.extend(flat.operands(node))
    return cone


def _cone_signature(flat: Flat, root, cone: set) -> str:
    """A digest of the cone that does not depend on instruction order or names: each node
    hashed with its opcode, shape, enclosing fusion kinds and its operands' hashes (inputs from
    outside the cone by shape), and the cone's partition into top-level fusions."""
    memo = {}

    def node_hash(node):
        if node not in memo:
            instr = flat.instr(node)
            ops = ",".join(
                node_hash(o) if o in cone else f"in {flat.instr(o).shape if o else '?'}"
                for o in flat.operands(node)
            )
            memo[node] = digest([f"{instr.opcode} {instr.shape} @{flat.kinds(node[0])}({ops})"])
        return memo[node]

    groups = collections.defaultdict(list)
    for node in cone:
        groups[node[0][:1] or (node[1],)].append(node_hash(node))
    return digest([node_hash(root), *sorted(",".join(sorted(g)) for g in groups.values())])


def _cone_listing(flat: Flat, cone: set) -> list[str]:
    """The cone, one line per top-level instruction (a fusion: its kind and the ops of the
    cone inside it, nested fusions' kinds in parentheses), in text order."""
    lines, group = [], None
    for node in flat.nodes():
        if node not in cone:
            continue
        instr = flat.instr(node)
        op = f"{instr.opcode} {instr.shape}"
        if instr.opcode == "custom-call":
            op += f" [{_attr(instr, 'custom_call_target')}]"
        top = node[0][:1]
        if len(node[0]) > 1:
            op = f"({flat.kinds(node[0]).split('>', 1)[1]}) {op}"
        if not top or top != group:
            lines.append(f"fusion [{flat.kinds(top)}]: {op}" if top else op)
        else:
            lines[-1] += f", {op}"
        group = top
    return lines


def rounding_cones(text: str) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """``(while body, [(signature, listing), ...])`` for every loop body that rounds a float
    to the grid: one entry per ``round-nearest-even``, the computation its rounded value
    depends on (`_cone`), from the carries' float view to the rounding. With
    ``rebuild="pullback"`` the forward loop's are F and G of the forward, the backward loop's
    the pullback's recomputation, which the rebuild takes."""
    comps = parse(text)
    bodies = [
        (_attr(i, "body") or "").lstrip("%")
        for comp in comps.values() for i in comp if i.opcode == "while"
    ]  # fmt: skip
    out = []
    for body in bodies:
        if body not in comps:
            continue
        flat = Flat(comps, body)
        found = []
        for node in flat.nodes():
            if flat.instr(node).opcode == "round-nearest-even":
                cone = _cone(flat, node)
                found.append((_cone_signature(flat, node, cone), _cone_listing(flat, cone)))
        if found:
            out.append((body, found))
    return out


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


def _verdict(sigs: Sequence[Sequence[str]]) -> tuple[bool, list[str]]:
    """Whether every loop body with two or more evaluations (the forward's and the backward's)
    holds the same multiset of signatures, and the report's line saying so."""
    loops = [s for s in sigs if len(s) >= 2]
    same = len(loops) >= 2 and all(s == loops[0] for s in loops)
    return same, ["", f"same: **{'yes' if same else 'no'}** ({len(loops)} loop bodies)", ""]


def _details(summary: str, body: Sequence[str]) -> list[str]:
    """A collapsed block listing one evaluation's ops."""
    return [f"<details><summary>{summary}</summary>", "", "```", *body, "```", "", "</details>", ""]


def _isolated_section(kind: str, dtype: str, target: str) -> list[str]:
    found = analyse(compiled_text(kind, dtype, target))
    lines, sigs = [f"### {kind}, {dtype} compute", ""], []
    for name, regions in found:
        sig = sorted(digest(r) for r in regions)
        sigs.append(sig)
        listed = ", ".join(f"{digest(r)} ({len(r)} ops)" for r in regions)
        lines.append(f"- `{name}`: {listed}")
    same, verdict = _verdict(sigs)
    lines += verdict + _distinct_details(found)
    print(f"  isolated {kind} {dtype}: same={same} {sigs}", flush=True)
    return lines


def _distinct_details(found: Sequence[tuple[str, list[list[str]]]]) -> list[str]:
    """Each distinct evaluation's listing once, in order of appearance across the loop bodies
    (where the forward's and the backward's differ, both are shown)."""
    listings = {}
    for _, regions in found:
        for r in regions:
            listings.setdefault(digest(r), r)
    return [line for d, r in listings.items() for line in _details(d, r)]


def _pullback_section(kind: str, dtype: str, target: str) -> list[str]:
    found = rounding_cones(compiled_text(kind, dtype, target, rebuild="pullback"))
    lines, sigs, listings = [f"### {kind}, {dtype} compute", ""], [], {}
    for name, cones in found:
        sigs.append(sorted(sig for sig, _ in cones))
        listed = ", ".join(f"{sig} ({len(listing)} top-level ops)" for sig, listing in cones)
        lines.append(f"- `{name}`: {listed}")
        listings.update(cones)
    same, verdict = _verdict(sigs)
    lines += verdict
    for sig, listing in listings.items():
        lines += _details(sig, listing)
    print(f"  pullback {kind} {dtype}: same={same} {sigs}", flush=True)
    return lines


def report(
    target: str, cases: Sequence[tuple[str, str]], argv: Sequence[str],
    rebuilds: Sequence[str] = ("isolated", "pullback"),
) -> str:  # fmt: skip
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
            f"F/G in the compiled forward and the backward's rebuild, {label} target",
            "op sequences of the forward's F/G and the backward's rebuilding F/G, "
            + " and ".join(f"rebuild={r!r}" for r in rebuilds),
            _report.command_line("experiments.exact_hlo", argv),
        ),
        "",
        "Gradient (parameters and the rebuild-mismatch count, with the updated BatchNorm "
        "statistics as an output, as a training step takes them) of a fixed-point "
        "`ReversibleSequence` of 4 units (width 64; conv: batch 32, 16x16; "
        "transformer: batch 8, 128 tokens, 4 heads), `unroll=1`. `same`: the forward loop's "
        "and the backward loop's are the same op sequences (as multisets).",
        "",
    ]
    intros = {
        "isolated": f"Per while-loop body holding isolated branch evaluations ({where}): each "
        "branch's op sequence digest and length (opcodes, shapes, fusion kinds with their fused "
        "ops, custom-call targets; names stripped; the instructions the int32 rounded output "
        "depends on).",
        "pullback": "No barriers: the final compiled program. Per while-loop body, one entry per "
        "rounding to the grid (`round-nearest-even`): the computation the rounded value "
        "depends on, from the int32 carries' float view to the rounding (fusions opened, "
        "not crossing int32 values), as a digest of its dataflow (opcodes, shapes, the "
        "enclosing fusions' kinds, operands; names and instruction order left out) and of "
        "its partition into top-level fusions; the count of those. In the forward loop "
        "they are F and G of the forward, in the backward loop the pullback's "
        "recomputation, from which this mode rebuilds. Each distinct one is listed: one "
        "line per top-level instruction, a fusion with its kind and the cone's ops inside "
        "it (nested fusions' kinds in parentheses).",
    }
    sections = {"isolated": _isolated_section, "pullback": _pullback_section}
    for mode in ("isolated", "pullback"):
        if mode in rebuilds:
            lines += [f"## rebuild={mode!r}", "", intros[mode], ""]
            for kind, dtype in cases:
                lines += sections[mode](kind, dtype, target)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=TARGETS, default="h100")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument(
        "--rebuild", nargs="+", choices=("isolated", "pullback"), default=["isolated", "pullback"]
    )
    args = parser.parse_args(argv)
    cases = [("conv", "bfloat16"), ("transformer", "float32"), ("transformer", "bfloat16")]
    text = report(args.target, cases, argv, args.rebuild)
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

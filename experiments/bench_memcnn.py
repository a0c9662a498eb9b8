"""Reversible step-time overhead of revjax and of MemCNN (PyTorch), each against its plain twin.

Measures, side by side in one process on the CPU, the median train-step time (forward,
backward, SGD + momentum update) of four variants of one RevNet (default RevNet-38: units 3-3-3,
widths 32/32/64/112, CIFAR-shaped input):

- ``memcnn``: the network in PyTorch, each reversible unit an
  ``memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(F, G), keep_input=False)``
  (activations freed in the forward, rebuilt in the backward);
- ``memcnn plain``: the same PyTorch network with the wrapper disabled (``disable=True``:
  plain autograd, every activation stored);
- ``revjax``: `revjax.RevNet` with memory saving on, the trainer's train step;
- ``revjax plain``: the same RevNet with ``memory_saving=False``.

Absolute times of two frameworks on one CPU say little (different conv kernels, eager PyTorch
against compiled XLA); the figures reported are the ratios of each library's reversible step to
its own plain twin, with the four variants' samples interleaved (round-robin) so all four see
the same load. The process is bound to ``--threads`` CPUs (``os.sched_setaffinity``) before
jax starts, and PyTorch is given the same number of threads, so both libraries compute on the
same cores. The PyTorch network mirrors revjax's layer for layer (pre-activation basic
functions, bias-free convs, BatchNorm momentum 0.99 / epsilon 1e-3, entry units with
pool-and-pad shortcuts that store their input, the same parameter count). Before timing, the
MemCNN network's reversible gradients are compared with its plain ones on the same weights,
so the table also shows that MemCNN's memory saving runs correctly with the installed torch.

Needs ``torch`` and ``memcnn``: ``pip install -e '.[benchmark]'`` (without torch installed,
pip's default Linux torch wheel is the CUDA build, several GB; the CPU build from
https://download.pytorch.org/whl/cpu installed first is enough here).

    python -m experiments.bench_memcnn                      # RevNet-38, batch 32, 1 thread
    python -m experiments.bench_memcnn --batch 64 --threads 2
    python -m experiments.bench_memcnn --quick              # tiny sizes, a smoke run

Writes ``<out-dir>/bench_memcnn.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from importlib.metadata import version
from pathlib import Path

import jax  # its CPU client (and thread pools) start at first use, after pin_threads

from experiments import _report
from revjax.measure import time_interleaved

NAME = "bench_memcnn"
MODULE = f"experiments.{NAME}"
VARIANTS = ("memcnn", "memcnn plain", "revjax", "revjax plain")

# The RevNet-38 of the paper (revjax.revnet38) and a tiny one for --quick.
FULL = dict(units_per_stage=(3, 3, 3), widths=(32, 32, 64, 112), batch=32, size=32, repeats=21)
QUICK = dict(units_per_stage=(2, 2), widths=(8, 8, 16), batch=4, size=8, repeats=2)
BN_MOMENTUM, BN_EPSILON = 0.99, 1e-3  # revjax's (and the official code's) BatchNorm


def pin_threads(threads: int) -> list[int]:
    """Binds this process to ``threads`` CPUs (before jax starts its thread pools)."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise SystemExit(f"{NAME}: --threads {threads} but only {len(cpus)} CPUs are available")
    os.sched_setaffinity(0, cpus[:threads])
    return cpus[:threads]


def import_torch_memcnn():
    """``(torch, memcnn)``; exits with the install command when either is missing."""
    try:
        import torch
    except ImportError as err:
        raise SystemExit(
            f"{NAME}: needs PyTorch ({err}): `pip install -e '.[benchmark]'` (or the CPU "
            "build first: `pip install torch --index-url https://download.pytorch.org/whl/cpu`)."
        ) from err
    with warnings.catch_warnings():
        # memcnn decorates with torch.cuda.amp.custom_fwd/custom_bwd, deprecated in torch 2.4+.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            import memcnn
        except ImportError as err:
            raise SystemExit(
                f"{NAME}: needs MemCNN ({err}): `pip install -e '.[benchmark]'`."
            ) from err
    return torch, memcnn


def torch_revnet(torch, memcnn, units_per_stage, widths, *, num_classes: int = 10):
    """The PyTorch twin of `revjax.RevNet` (basic blocks, CIFAR stem) on NCHW images.

    Returns ``(model, wrappers)``: the network and its `memcnn.InvertibleModuleWrapper` units;
    set ``wrapper.disable = True`` on each for plain autograd.
    """
    nn = torch.nn
    F = torch.nn.functional

    def conv(cin, cout, stride):
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    def bn(c):
        # PyTorch's momentum weighs the new batch: 1 - flax's decay.
        return nn.BatchNorm2d(c, eps=BN_EPSILON, momentum=1 - BN_MOMENTUM)

    class Basic(nn.Module):
        """(BN -> ReLU -> conv3x3) x 2, the leading BN-ReLU optional."""

        def __init__(self, cin, cout, stride=1, preact=True):
            super().__init__()
            self.bn1 = bn(cin) if preact else None
            self.conv1, self.bn2, self.conv2 = (
                conv(cin, cout, stride),
                bn(cout),
                conv(cout, cout, 1),
            )

        def forward(self, x):
            # No in-place ReLU: MemCNN frees and refills the wrapped units' inputs.
            h = x if self.bn1 is None else F.relu(self.bn1(x))
            return self.conv2(F.relu(self.bn2(self.conv1(h))))

    def pool_pad(x, stride, cout):
        if stride > 1:
            x = F.avg_pool2d(x, stride, stride)
        extra = cout - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2)) if extra else x

    class Entry(nn.Module):
        """A stage's first unit: strides / widens, not reversible (autograd stores its input)."""

        def __init__(self, cin, cout, stride, preact):
            super().__init__()
            self.stride, self.cout = stride, cout // 2
            self.f = Basic(cin // 2, cout // 2, stride, preact)
            self.g = Basic(cout // 2, cout // 2)

        def forward(self, x):
            x1, x2 = torch.chunk(x, 2, dim=1)
            y1 = pool_pad(x1, self.stride, self.cout) + self.f(x2)
            y2 = pool_pad(x2, self.stride, self.cout) + self.g(y1)
            return torch.cat([y1, y2], dim=1)

    wrappers = []
    layers = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False), bn(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, (units, cout) in enumerate(zip(units_per_stage, widths[1:])):
        layers.append(Entry(cin, cout, 1 if i == 0 else 2, preact=i > 0))
        for _ in range(units - 1):
            coupling = memcnn.AdditiveCoupling(
                Basic(cout // 2, cout // 2), Basic(cout // 2, cout // 2)
            )
            wrapper = memcnn.InvertibleModuleWrapper(
                coupling, keep_input=False, keep_input_inverse=False
            )
            wrappers.append(wrapper)
            layers.append(wrapper)
        cin = cout
    layers += [
        bn(cin),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cin, num_classes),
    ]
    return nn.Sequential(*layers), wrappers


def torch_step(torch, model, images, labels):
    """One SGD + momentum train step of ``model`` (weight decay 2e-4, as the revjax config)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        opt.step()

    return step


def memcnn_gradient_error(torch, model, wrappers, images, labels) -> float:
    """Relative difference of the gradients with MemCNN's memory saving on and off (same
    weights, same batch, float64; BatchNorm statistics restored between the two)."""
    model = model.double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {}
    for disable in (False, True):
        model.load_state_dict(state)
        for w in wrappers:
            w.disable = disable
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images.double().clone()), labels)
        loss.backward()
        grads[disable] = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.load_state_dict(state)
    model.float()
    for w in wrappers:
        w.disable = False
    diff = torch.linalg.vector_norm(grads[False] - grads[True])
    return float(diff / torch.linalg.vector_norm(grads[True]))


def measure(setting: dict, *, warmup: int, repeats: int, fast_compile: bool) -> dict:
    """Gradient check, parameter counts and interleaved step times of the four variants."""
    torch, memcnn = import_torch_memcnn()
    units, widths = setting["units_per_stage"], setting["widths"]
    batch, size = setting["batch"], setting["size"]
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
    model, wrappers = torch_revnet(torch, memcnn, units, widths)
    plain = copy.deepcopy(model)
    plain_wrappers = [m for m in plain.modules() if isinstance(m, memcnn.InvertibleModuleWrapper)]
    for w in plain_wrappers:
        w.disable = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # memcnn's use of the deprecated Tensor.storage()
        grad_error = memcnn_gradient_error(torch, model, wrappers, images, labels)
    print(f"  memcnn reversible vs plain gradients (float64): {grad_error:.1e}", flush=True)
    model.train()
    plain.train()

    overrides = dict(units_per_stage=units, widths=widths)
    options = _report.CPU_MEMORY_COMPILER_OPTIONS if fast_compile else None
    fns, params = {}, {}
    for variant, saving in (("revjax", True), ("revjax plain", False)):
        step, state, data = _report.concrete_train_step(
            "revnet38", {**overrides, "memory_saving": saving}, batch_size=batch, image_size=size
        )
        fns[variant] = (step.lower(state, data).compile(compiler_options=options), (state, data))
        params[variant] = _report.num_params(state)
    fns["memcnn"] = (torch_step(torch, model, images, labels), ())
    fns["memcnn plain"] = (torch_step(torch, plain, images, labels), ())
    params["memcnn"] = params["memcnn plain"] = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = time_interleaved({v: fns[v] for v in VARIANTS}, warmup=warmup, repeats=repeats)
    return {
        "grad_error": grad_error,
        "params": params,
        "times": {v: times[v]["median"] for v in VARIANTS},
        "min_times": {v: times[v]["min"] for v in VARIANTS},
    }


def to_markdown(result: dict, head: str) -> str:
    t, m, p = result["times"], result["min_times"], result["params"]
    columns = ["library", "params", "reversible / plain step time", "(fastest samples)"]
    rows = [
        [
            name,
            f"{p[key]:,}",
            f"{t[key] / t[f'{key} plain']:.2f}",
            f"{m[key] / m[f'{key} plain']:.2f}",
        ]
        for name, key in (("MemCNN (PyTorch)", "memcnn"), ("revjax", "revjax"))
    ]
    return "\n".join(
        [
            head,
            "",
            _report.markdown_table(columns, rows),
            "",
            "Reversible / plain: the median train-step time of the library's memory-saving "
            "network over that of the same network with plain autograd, all four measured in "
            "this run with their samples interleaved; the next column gives the same ratio of "
            "the fastest samples (the least disturbed by other load on a shared machine). "
            "Absolute times are not compared: eager PyTorch and compiled XLA run different CPU "
            "kernels. MemCNN's backward rebuilds a unit's input with one forward of F and G, "
            "then runs F and G forward again to take their gradients (two extra forwards per "
            "unit); revjax uses one recomputation of F and G "
            "both to rebuild the input and to pull back the gradient (one extra forward).",
            "",
            f"- MemCNN's reversible gradients vs its plain ones (same weights and batch, float64): "
            f"relative error {result['grad_error']:.1e}.",
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPUs for both libraries")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    cpus = pin_threads(args.threads)
    torch, _ = import_torch_memcnn()
    torch.set_num_threads(args.threads)
    if jax.default_backend() != "cpu":
        raise SystemExit(
            f"{NAME}: measures both libraries on the CPU; run with JAX_PLATFORMS=cpu "
            f"(jax.default_backend() is {jax.default_backend()!r})."
        )
    setting = dict(QUICK if args.quick else FULL)
    if args.batch:
        setting["batch"] = args.batch
    repeats = args.repeats or setting["repeats"]
    units = "-".join(map(str, setting["units_per_stage"]))
    head = _report.header(
        "Reversible overhead, revjax vs MemCNN",
        f"RevNet (units {units}, widths {'/'.join(map(str, setting['widths']))}), full train "
        f"step (forward, backward, SGD + momentum), batch {setting['batch']}, "
        f"{setting['size']}x{setting['size']}, float32; both libraries on the same "
        f"{args.threads} CPU{'s' * (args.threads > 1)} (process affinity {cpus}, "
        f"torch.set_num_threads({args.threads})); torch {torch.__version__}, memcnn "
        f"{version('memcnn')}; median of {repeats} interleaved rounds after {args.warmup} "
        "warm-up calls; revjax's scans fully unrolled (its CPU default)"
        + ("; XLA:CPU backend optimisation level 0 (smoke test)" if args.quick else ""),
        _report.command_line(MODULE, argv),
    )
    print(head, flush=True)
    result = measure(setting, warmup=args.warmup, repeats=repeats, fast_compile=args.quick)
    for v in VARIANTS:
        print(f"  {v}: {result['times'][v] * 1e3:.1f} ms", flush=True)
    _report.write_report(args.out_dir, NAME, to_markdown(result, head))
    return result


if __name__ == "__main__":
    main()

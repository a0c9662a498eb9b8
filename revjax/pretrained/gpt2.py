"""Hugging Face GPT-2 checkpoints into `revjax.GPT`, and back.

``GPT2LMHeadModel`` computes the function of `revjax.GPT` with its defaults (pre-LN blocks,
LayerNorm epsilon 1e-5, tanh GELU, one fused qkv projection, the head tied to the token
embedding). The GELU travels in ``config.json``'s ``activation_function``: Hugging Face's
tanh forms (``"gelu_new"``, GPT-2's, and its aliases) are ``mlp="gelu"``, its ``"gelu"`` and
``"gelu_python"`` (the exact erf GELU of PyTorch's ``nn.GELU()``) are ``mlp="gelu_exact"``.
Its ``Conv1D`` layers store weights [in, out], which is the layout of an `nnx.Linear` kernel,
so every tensor is copied as it is:

===================================  ===================================
Hugging Face key                     revjax parameter
===================================  ===================================
``wte.weight`` [V, D]                ``embed.embedding`` (also the head)
``wpe.weight`` [C, D]                ``pos_embed``
``h.i.ln_1.{weight,bias}``           ``attn.norm.{scale,bias}[i]``
``h.i.attn.c_attn.{weight,bias}``    ``attn.qkv.{kernel,bias}[i]``
``h.i.attn.c_proj.*``                ``attn.proj.*[i]``
``h.i.ln_2.*``                       ``mlp.norm.*[i]``
``h.i.mlp.c_fc.*`` / ``c_proj.*``    ``mlp.fc1.*[i]`` / ``mlp.fc2.*[i]``
``ln_f.*``                           ``norm.*``
===================================  ===================================

Keys may carry a ``transformer.`` prefix (``save_pretrained``'s files do); the attention-mask
buffers of older files (``h.i.attn.bias``, ``masked_bias``) and a ``lm_head.weight`` equal to
``wte.weight`` are skipped. The number of heads is not in the tensors' shapes: it is read from
the ``config.json`` beside the weights (``n_head``), or given.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from revjax.gpt import GPT, LanguageModelOptions, RevGPT
from revjax.pretrained.checkpoint_files import CheckpointMismatch, read_checkpoint

__all__ = ["gpt2_state_dict", "load_gpt2", "load_gpt2_weights", "save_gpt2"]

_BLOCK = {  # Hugging Face name within block i -> (revjax branch, layer, parameter)
    "ln_1.weight": ("attn", "norm", "scale"),
    "ln_1.bias": ("attn", "norm", "bias"),
    "attn.c_attn.weight": ("attn", "qkv", "kernel"),
    "attn.c_attn.bias": ("attn", "qkv", "bias"),
    "attn.c_proj.weight": ("attn", "proj", "kernel"),
    "attn.c_proj.bias": ("attn", "proj", "bias"),
    "ln_2.weight": ("mlp", "norm", "scale"),
    "ln_2.bias": ("mlp", "norm", "bias"),
    "mlp.c_fc.weight": ("mlp", "fc1", "kernel"),
    "mlp.c_fc.bias": ("mlp", "fc1", "bias"),
    "mlp.c_proj.weight": ("mlp", "fc2", "kernel"),
    "mlp.c_proj.bias": ("mlp", "fc2", "bias"),
}
_SKIPPED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# Hugging Face's activation names (transformers.activations.ACT2FN) -> revjax.GPT's ``mlp``:
# the tanh approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) under five names,
# and the exact erf GELU. The first name of each is what `save_gpt2` writes.
_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_python_tanh": "gelu",
                "gelu_fast": "gelu", "gelu_accurate": "gelu",
                "gelu": "gelu_exact", "gelu_python": "gelu_exact"}
_EXPORTED = {"gelu": "gelu_new", "gelu_exact": "gelu"}


def _files(path: str | os.PathLike) -> tuple[str, dict]:
    """The weights file and the ``config.json`` beside it (``{}`` when there is none)."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        weights = os.path.join(path, "model.safetensors")
        if not os.path.exists(weights):
            weights = os.path.join(path, "pytorch_model.bin")
        folder = path
    else:
        weights, folder = path, os.path.dirname(path)
    config_file = os.path.join(folder, "config.json")
    config = {}
    if os.path.exists(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    return weights, config


def _strip(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        key = key.removeprefix("transformer.")
        if _SKIPPED.match(key):
            continue
        out[key] = value
    head = out.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, out.get("wte.weight")):
        raise CheckpointMismatch("GPT-2 checkpoint", ["lm_head.weight differs from wte.weight; "
                                                      "revjax.GPT ties its head to the embedding"])
    return out


def load_gpt2(
    path: str | os.PathLike, *, num_heads: int | None = None, rngs: nnx.Rngs | None = None,
    **overrides: Any,
) -> GPT:
    """A `revjax.GPT` holding a Hugging Face GPT-2 checkpoint.

    Args:
      path: a directory from ``save_pretrained`` (``model.safetensors`` or
        ``pytorch_model.bin``, and ``config.json``) or a weights file.
      num_heads: attention heads (default: ``n_head`` of ``config.json``).
      rngs: keys for building the model before its weights are set (default ``nnx.Rngs(0)``).
      **overrides: other `revjax.GPT` options (``dtype``, ``dropout``, ``remat``...); the
        architecture comes from the checkpoint. ``mlp`` (``"gelu"`` or ``"gelu_exact"``) names
        the GELU of a weights file without a ``config.json`` (default GPT-2's tanh GELU).

    Raises:
      CheckpointMismatch: unknown, missing or misshapen tensors (all listed; nothing loaded),
        or an activation `revjax.GPT` does not have (a GELU other than the tanh and erf
        forms) or a LayerNorm epsilon other than GPT-2's.
    """
    weights, config = _files(path)
    state = _strip(read_checkpoint(weights))
    heads = num_heads or config.get("n_head")
    if heads is None:
        raise ValueError(f"{weights}: no config.json with n_head beside it; pass num_heads=.")
    problems = []
    activation = config.get("activation_function", "gelu_new")  # GPT2Config's default
    mlp = _ACTIVATIONS.get(activation)
    if mlp is None:
        tanh = ", ".join(n for n, m in _ACTIVATIONS.items() if m == "gelu")
        problems.append(f"activation_function={activation!r}: revjax.GPT has the tanh GELU "
                        f"({tanh}) and the exact one (gelu, gelu_python) only")
    elif "activation_function" in config and overrides.get("mlp", mlp) != mlp:
        problems.append(f"mlp={overrides['mlp']!r} given, but the checkpoint's "
                        f"activation_function={activation!r} is mlp={mlp!r}")
    elif overrides.get("mlp", mlp) not in _EXPORTED:
        problems.append(f"mlp={overrides['mlp']!r}: a GPT-2 checkpoint's MLP is a GELU one "
                        "(mlp='gelu' or 'gelu_exact')")
    # Either GELU has the same tensors: with a problem above, build one to list the rest.
    overrides["mlp"] = overrides.get("mlp", mlp) if not problems else "gelu"
    if abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon={config['layer_norm_epsilon']} (GPT uses 1e-5)")
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise CheckpointMismatch(f"{weights} as GPT-2", ["no wte.weight / wpe.weight"])
    vocab, dim = state["wte.weight"].shape
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("h.")), default=-1)
    model = GPT(rngs=rngs or nnx.Rngs(0), vocab_size=vocab, context_length=len(state["wpe.weight"]),
                embed_dim=dim, depth=depth, num_heads=heads, **overrides)
    targets = {"wte.weight": model.embed.embedding, "wpe.weight": model.pos_embed,
               "ln_f.weight": model.norm.scale, "ln_f.bias": model.norm.bias}
    for i in range(depth):
        for name, (branch, layer, param) in _BLOCK.items():
            targets[f"h.{i}.{name}"] = (getattr(getattr(model, branch), layer), param, i)
    problems += [f"unexpected tensor {k}" for k in sorted(set(state) - set(targets))]
    problems += [f"missing tensor {k}" for k in sorted(set(targets) - set(state))]
    values = {}
    for key, target in targets.items():
        if key not in state:
            continue
        if isinstance(target, tuple):
            module, param, i = target
            variable = getattr(module, param)
            expected = variable.shape[1:]
        else:
            variable, i, expected = target, None, target.shape
        if tuple(state[key].shape) != tuple(expected):
            problems.append(f"{key}: shape {tuple(state[key].shape)}, model {tuple(expected)}")
        values[key] = (variable, i)
    if problems:
        raise CheckpointMismatch(f"{weights} as GPT-2", problems)
    for key, (variable, i) in values.items():
        value = jnp.asarray(state[key], variable.dtype)
        variable[...] = value if i is None else variable[...].at[i].set(value)
    return model


def load_gpt2_weights(model: GPT | RevGPT, path: str | os.PathLike) -> GPT | RevGPT:
    """Loads a GPT-2 checkpoint (`load_gpt2`) into ``model`` in place and returns it.

    A `GPT` takes the weights as they are; a `RevGPT` takes `RevGPT.from_gpt` of them (the
    checkpoint's attention as F, its MLP as G). Only parameters change: the model keeps its
    own dropout, dtypes and reversible options.

    Raises:
      CheckpointMismatch: the checkpoint's architecture is not the model's (vocabulary size,
        context, width, depth, heads: all listed; nothing loaded), or `load_gpt2`'s errors.
    """
    if not isinstance(model, GPT | RevGPT):
        raise TypeError(f"GPT-2 checkpoints load into revjax.GPT or revjax.RevGPT, got "
                        f"{type(model).__name__}.")
    weights, config = _files(path)
    # A weights file without a config.json does not name its GELU: take the model's.
    mlp = {} if "activation_function" in config else {"mlp": model.options.mlp}
    gpt = load_gpt2(path, num_heads=config.get("n_head", model.num_heads), **mlp)
    own = {f: getattr(model.options, f) for f in LanguageModelOptions.ARCHITECTURE}
    theirs = {f: getattr(gpt.options, f) for f in LanguageModelOptions.ARCHITECTURE}
    problems = [f"{f}: checkpoint {theirs[f]!r}, model {own[f]!r}" for f in own
                if own[f] != theirs[f]]
    if problems:
        fix = ("The model's vocabulary is its dataset's: prepare the text with the "
               "pretraining data's vocabulary (python -m revjax.prepare ... --vocab-from DIR)."
               if own["vocab_size"] != theirs["vocab_size"] else "")
        raise CheckpointMismatch(f"{weights} into this {type(model).__name__}", problems, fix)
    source = RevGPT.from_gpt(gpt) if isinstance(model, RevGPT) else gpt
    nnx.update(model, nnx.state(source, nnx.Param))
    return model


def gpt2_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """A `revjax.GPT` with GPT-2's options as Hugging Face tensors (``transformer.`` keys).

    Either GELU exports (`save_gpt2` names it in ``config.json``: ``"gelu_new"`` for
    ``mlp="gelu"``, ``"gelu"`` for ``mlp="gelu_exact"``).

    Raises:
      ValueError: a model GPT-2 cannot express (RoPE, RMSNorm, SwiGLU, no biases).
    """
    o = model.options
    if (o.position, o.norm, o.bias) != ("learned", "layernorm", True) or o.mlp not in _EXPORTED:
        raise ValueError("Only GPT-2's layout exports (learned positions, LayerNorm, a GELU MLP, "
                         f"biases); this model has {o.position}, {o.norm}, {o.mlp}, bias={o.bias}.")
    out = {"transformer.wte.weight": model.embed.embedding[...],
           "transformer.wpe.weight": model.pos_embed[...],
           "transformer.ln_f.weight": model.norm.scale[...],
           "transformer.ln_f.bias": model.norm.bias[...]}
    for i in range(model.depth):
        for name, (branch, layer, param) in _BLOCK.items():
            variable = getattr(getattr(getattr(model, branch), layer), param)
            out[f"transformer.h.{i}.{name}"] = variable[...][i]
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


def save_gpt2(model: GPT, directory: str | os.PathLike) -> str:
    """Writes ``model.safetensors`` and ``config.json`` that
    ``transformers.GPT2LMHeadModel.from_pretrained(directory)`` reads; returns the directory.

    Raises:
      ValueError: as `gpt2_state_dict` (before anything is written).
    """
    from safetensors.numpy import save_file

    state = gpt2_state_dict(model)
    directory = os.path.expanduser(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
              "vocab_size": model.vocab_size, "n_positions": model.context_length,
              "n_embd": model.embed_dim, "n_layer": model.depth, "n_head": model.num_heads,
              "n_inner": None,
              "activation_function": _EXPORTED[model.options.mlp], "layer_norm_epsilon": 1e-5,
              "tie_word_embeddings": True}
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    return directory

"""Pretrained ViTs: timm state dicts and big_vision / AugReg ``.npz`` files into `ViT`, and back.

timm's ``vit_{tiny,small,base}_patch16_{224,384}`` compute the same function as `revjax.ViT`
(pre-LN blocks, LayerNorm epsilon 1e-6, exact GELU, one fused qkv projection); only the
parameter layouts differ:

==============================  =================================  =============================
timm key                        revjax parameter                   conversion
==============================  =================================  =============================
``patch_embed.proj.weight``     ``patch_embed.conv.kernel``        OIHW -> HWIO
``cls_token``, ``pos_embed``    ``cls_token``, ``pos_embed``       (pos_embed resampled, below)
``blocks.i.norm1.*``            ``attn.norm.{scale,bias}[i]``
``blocks.i.attn.qkv.*``         ``attn.qkv.{kernel,bias}[i]``      transposed; rows [q; k; v],
                                                                   each heads x head_dim
``blocks.i.attn.proj.*``        ``attn.proj.*[i]``                 transposed
``blocks.i.norm2.*``            ``mlp.norm.*[i]``
``blocks.i.mlp.fc{1,2}.*``      ``mlp.fc{1,2}.*[i]``               transposed
``norm.*`` / ``fc_norm.*``      ``norm.*``                         ``fc_norm``: pool ``"avg"``
``head.*``                      ``head.*``                         transposed
==============================  =================================  =============================

Pooling follows from the keys: a class token with ``norm`` is timm's ``global_pool="token"``
(revjax ``pool="cls"``), a class token with ``fc_norm`` is ``global_pool="avg"`` (``pool="avg"``),
no class token with ``norm`` is ``global_pool="avg", fc_norm=False`` (``pool="mean"``).

When the model's image size differs from the checkpoint's, the position embedding of the patch
grid is resampled as timm does (the class token's entry is kept): bicubic with antialiasing for
state dicts, bilinear without for ``.npz`` files (timm's ``checkpoint_filter_fn`` and
``_load_weights``). A head of another size is not loaded: the model keeps its freshly
initialised head, and the log says so.

Loading never runs code from a file: ``.safetensors`` through the safetensors numpy API (no
torch), ``.npz`` with ``allow_pickle=False``, ``.pth`` / ``.bin`` / ``.pt`` only through
``torch.load(weights_only=True)``. Any mismatch (an unknown or missing key, a wrong shape, an
architecture the model cannot express) raises one `CheckpointMismatch` that lists every
difference; nothing is loaded then.

Modules: ``checkpoint_files`` (reading files, `CheckpointMismatch`), ``timm_layout`` (timm's keys
and shapes, loading into a `ViT`), ``export`` (a `ViT` back to timm's layout), ``big_vision``
(``.npz`` files renamed to timm's layout).
"""

from revjax.pretrained import timm_layout
from revjax.pretrained.big_vision import load_big_vision as load_big_vision
from revjax.pretrained.big_vision import timm_state_from_big_vision as timm_state_from_big_vision
from revjax.pretrained.checkpoint_files import CheckpointMismatch as CheckpointMismatch
from revjax.pretrained.checkpoint_files import read_checkpoint as read_checkpoint
from revjax.pretrained.export import save_timm as save_timm
from revjax.pretrained.export import timm_state_dict as timm_state_dict
from revjax.pretrained.gpt2 import gpt2_state_dict as gpt2_state_dict
from revjax.pretrained.gpt2 import load_gpt2 as load_gpt2
from revjax.pretrained.gpt2 import load_gpt2_weights as load_gpt2_weights
from revjax.pretrained.gpt2 import save_gpt2 as save_gpt2
from revjax.pretrained.timm_layout import load_timm as load_timm
from revjax.pretrained.timm_layout import load_vit_weights as load_vit_weights
from revjax.pretrained.timm_layout import timm_config as timm_config

#: timm's ViT presets this package reads and writes (names as `timm.create_model` takes them),
#: each with its architecture (`image_size`, `patch_size`, `embed_dim`, `depth`, `num_heads`).
TIMM_VARIANTS: dict[str, dict[str, int]] = timm_layout.TIMM_VARIANTS

__all__ = [
    "CheckpointMismatch",
    "TIMM_VARIANTS",
    "gpt2_state_dict",
    "load_big_vision",
    "load_gpt2",
    "load_gpt2_weights",
    "load_timm",
    "load_vit_weights",
    "read_checkpoint",
    "save_gpt2",
    "save_timm",
    "timm_config",
    "timm_state_dict",
    "timm_state_from_big_vision",
]

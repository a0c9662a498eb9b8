"""revjax: reversible residual networks in JAX / Flax NNX.

Backpropagation without storing activations (Gomez et al., NeurIPS 2017): reversible units
rebuild their inputs from their outputs in the backward pass, so activation memory stays flat
with depth.
"""

from revjax._core import Coupling as Coupling
from revjax._core import additive_coupling as additive_coupling
from revjax._core import affine_coupling as affine_coupling
from revjax._core import default_unroll as default_unroll
from revjax._core import get_coupling as get_coupling
from revjax._core import inverse_sequence as inverse_sequence
from revjax._core import merge_halves as merge_halves
from revjax._core import relative_error as relative_error
from revjax._core import reversible_sequence as reversible_sequence
from revjax._core import split_halves as split_halves

__version__ = "0.1.0"

__all__ = [
    "Coupling",
    "additive_coupling",
    "affine_coupling",
    "default_unroll",
    "get_coupling",
    "inverse_sequence",
    "merge_halves",
    "relative_error",
    "reversible_sequence",
    "split_halves",
]

"""The reversible core: couplings and `reversible_sequence`, in pure JAX (no Flax).

A reversible unit works on two halves ``(x1, x2)`` of its input::

    y1 = x1 (+) F(x2)
    y2 = x2 (+) G(y1)

where ``(+)`` is the coupling's combine rule. Because ``x2 = y2 (-) G(y1)`` and
``x1 = y1 (-) F(x2)``, the backward pass can rebuild every unit's input from its output, so a
sequence of n units stores only its output, whatever n is (Gomez et al., 2017).

The halves are carried in one of two arithmetics (`make_carry`): floating point, where the
rebuild is exact up to rounding, or int32 fixed point (``arithmetic="fixed"``), where each F/G
output is rounded to the grid ``2**-frac_bits`` before an integer addition, so the rebuild is
bit-exact whenever F computes the same bits twice. Every scan runs the same `unit_forward` /
`unit_inverse` on carries; the values crossing the custom VJPs stay floating.

The core is split by topic, and this module gathers its names:

- `revjax._coupling`: `Coupling`, the additive and affine couplings, `split_halves`.
- `revjax._carry`: the carry arithmetics (`make_carry`), fixed-point range and settings checks.
- `revjax._units`: `unit_forward` / `unit_inverse` and the helpers every scan over units shares.
- `revjax._sequence`: `reversible_sequence` (one custom VJP), `inverse_sequence`.
- `revjax._chain`: `reversible_chain` and its segments.
"""

from revjax._carry import ARITHMETICS as ARITHMETICS
from revjax._carry import DEFAULT_FRAC_BITS as DEFAULT_FRAC_BITS
from revjax._carry import CarryRangeError as CarryRangeError
from revjax._carry import FixedCarry as FixedCarry
from revjax._carry import FloatCarry as FloatCarry
from revjax._carry import TracedFixedCarry as TracedFixedCarry
from revjax._carry import carry_limit as carry_limit
from revjax._carry import check_arithmetic as check_arithmetic
from revjax._carry import dequantize as dequantize
from revjax._carry import make_carry as make_carry
from revjax._carry import quantize as quantize
from revjax._chain import ChainSegment as ChainSegment
from revjax._chain import chain_exact_units as chain_exact_units
from revjax._chain import reversible_chain as reversible_chain
from revjax._chain import sequence_segment as sequence_segment
from revjax._chain import shortcut_unit_segment as shortcut_unit_segment
from revjax._coupling import Coupling as Coupling
from revjax._coupling import additive_coupling as additive_coupling
from revjax._coupling import affine_coupling as affine_coupling
from revjax._coupling import affine_scale as affine_scale
from revjax._coupling import get_coupling as get_coupling
from revjax._coupling import merge_halves as merge_halves
from revjax._coupling import split_halves as split_halves
from revjax._sequence import SequenceSetting as SequenceSetting
from revjax._sequence import check_exact_every as check_exact_every
from revjax._sequence import exact_range as exact_range
from revjax._sequence import exact_slot as exact_slot
from revjax._sequence import exact_units as exact_units
from revjax._sequence import inverse_sequence as inverse_sequence
from revjax._sequence import relative_error as relative_error
from revjax._sequence import reversible_sequence as reversible_sequence
from revjax._units import default_unroll as default_unroll
from revjax._units import tie_to_cotangent as tie_to_cotangent
from revjax._units import unit_forward as unit_forward
from revjax._units import unit_inverse as unit_inverse

__all__ = [
    "ARITHMETICS",
    "DEFAULT_FRAC_BITS",
    "CarryRangeError",
    "ChainSegment",
    "Coupling",
    "additive_coupling",
    "affine_coupling",
    "carry_limit",
    "get_coupling",
    "inverse_sequence",
    "merge_halves",
    "reversible_chain",
    "reversible_sequence",
    "sequence_segment",
    "shortcut_unit_segment",
    "split_halves",
]

"""revjax: reversible residual networks in JAX / Flax NNX.

Backpropagation without storing activations (Gomez et al., NeurIPS 2017): reversible units
rebuild their inputs from their outputs in the backward pass, so activation memory stays flat
with depth.
"""

from revjax._carry import CarryRangeError as CarryRangeError
from revjax._carry import carry_limit as carry_limit
from revjax._chain import ChainSegment as ChainSegment
from revjax._chain import reversible_chain as reversible_chain
from revjax._chain import sequence_segment as sequence_segment
from revjax._chain import shortcut_unit_segment as shortcut_unit_segment
from revjax._coupling import Coupling as Coupling
from revjax._coupling import additive_coupling as additive_coupling
from revjax._coupling import affine_coupling as affine_coupling
from revjax._coupling import get_coupling as get_coupling
from revjax._coupling import merge_halves as merge_halves
from revjax._coupling import split_halves as split_halves
from revjax._platform import compiling_for as compiling_for
from revjax._platform import target_platform as target_platform
from revjax._sequence import inverse_sequence as inverse_sequence
from revjax._sequence import relative_error as relative_error
from revjax._sequence import reversible_sequence as reversible_sequence
from revjax._units import default_unroll as default_unroll
from revjax.drift import DriftMonitor as DriftMonitor
from revjax.drift import DriftWarning as DriftWarning
from revjax.drift import gradient_agreement as gradient_agreement
from revjax.drift import reconstruction_error as reconstruction_error
from revjax.generate import generate as generate
from revjax.generate import sample_next as sample_next
from revjax.gpt import GPT as GPT
from revjax.gpt import GPTOptions as GPTOptions
from revjax.gpt import LanguageModelOptions as LanguageModelOptions
from revjax.gpt import RevGPT as RevGPT
from revjax.gpt import RevGPTOptions as RevGPTOptions
from revjax.gpt import gpt2_small as gpt2_small
from revjax.gpt import gpt_1b as gpt_1b
from revjax.gpt import gpt_char as gpt_char
from revjax.gpt import gpt_char_cpu as gpt_char_cpu
from revjax.gpt import revgpt2_small as revgpt2_small
from revjax.gpt import revgpt_1b as revgpt_1b
from revjax.gpt import revgpt_char as revgpt_char
from revjax.gpt import revgpt_char_cpu as revgpt_char_cpu
from revjax.layers import CarryPeak as CarryPeak
from revjax.layers import RebuildMismatches as RebuildMismatches
from revjax.layers import RebuildMismatchWarning as RebuildMismatchWarning
from revjax.layers import ReversibleSequence as ReversibleSequence
from revjax.layers import check_carry_range as check_carry_range
from revjax.layers import check_rebuild as check_rebuild
from revjax.layers import pure_call as pure_call
from revjax.layers import rebuild_mismatches as rebuild_mismatches
from revjax.layers import record_rebuild_mismatches as record_rebuild_mismatches
from revjax.models import NetworkOptions as NetworkOptions
from revjax.models import ResNet as ResNet
from revjax.models import ResNetOptions as ResNetOptions
from revjax.models import RevNet as RevNet
from revjax.models import RevNetOptions as RevNetOptions
from revjax.models import apply as apply
from revjax.models import count_params as count_params
from revjax.models import functional as functional
from revjax.models import resnet32 as resnet32
from revjax.models import resnet50 as resnet50
from revjax.models import resnet101 as resnet101
from revjax.models import resnet110 as resnet110
from revjax.models import resnet164 as resnet164
from revjax.models import resnet_tiny as resnet_tiny
from revjax.models import revnet38 as revnet38
from revjax.models import revnet56 as revnet56
from revjax.models import revnet104 as revnet104
from revjax.models import revnet110 as revnet110
from revjax.models import revnet164 as revnet164
from revjax.models import revnet_tiny as revnet_tiny
from revjax.vit import RevViT as RevViT
from revjax.vit import RevViTOptions as RevViTOptions
from revjax.vit import TransformerOptions as TransformerOptions
from revjax.vit import ViT as ViT
from revjax.vit import ViTOptions as ViTOptions
from revjax.vit import revvit_b16 as revvit_b16
from revjax.vit import revvit_cifar as revvit_cifar
from revjax.vit import revvit_s16 as revvit_s16
from revjax.vit import revvit_ti16 as revvit_ti16
from revjax.vit import revvit_tiny as revvit_tiny
from revjax.vit import vit_b16 as vit_b16
from revjax.vit import vit_cifar as vit_cifar
from revjax.vit import vit_s16 as vit_s16
from revjax.vit import vit_ti16 as vit_ti16
from revjax.vit import vit_tiny as vit_tiny

__version__ = "0.2.0.dev0"

__all__ = [
    "CarryPeak",
    "CarryRangeError",
    "ReversibleSequence",
    "pure_call",
    "carry_limit",
    "check_carry_range",
    "RebuildMismatches",
    "RebuildMismatchWarning",
    "check_rebuild",
    "rebuild_mismatches",
    "record_rebuild_mismatches",
    "DriftMonitor",
    "DriftWarning",
    "gradient_agreement",
    "reconstruction_error",
    "ResNet",
    "RevNet",
    "NetworkOptions",
    "ResNetOptions",
    "RevNetOptions",
    "apply",
    "count_params",
    "functional",
    "resnet32",
    "resnet50",
    "resnet101",
    "resnet110",
    "resnet164",
    "resnet_tiny",
    "revnet38",
    "revnet56",
    "revnet104",
    "revnet110",
    "revnet164",
    "revnet_tiny",
    "RevViT",
    "ViT",
    "RevViTOptions",
    "TransformerOptions",
    "ViTOptions",
    "revvit_b16",
    "revvit_cifar",
    "revvit_s16",
    "revvit_ti16",
    "revvit_tiny",
    "vit_b16",
    "vit_cifar",
    "vit_s16",
    "vit_ti16",
    "vit_tiny",
    "ChainSegment",
    "Coupling",
    "additive_coupling",
    "affine_coupling",
    "default_unroll",
    "compiling_for",
    "target_platform",
    "get_coupling",
    "inverse_sequence",
    "merge_halves",
    "relative_error",
    "reversible_chain",
    "reversible_sequence",
    "sequence_segment",
    "shortcut_unit_segment",
    "split_halves",
    "generate",
    "sample_next",
    "GPT",
    "GPTOptions",
    "LanguageModelOptions",
    "RevGPT",
    "RevGPTOptions",
    "gpt2_small",
    "gpt_1b",
    "gpt_char",
    "gpt_char_cpu",
    "revgpt2_small",
    "revgpt_1b",
    "revgpt_char",
    "revgpt_char_cpu",
]

"""The training recipe and loop: one trainer for every experiment.

The paper's recipe (the RevNet authors' configs): SGD with momentum 0.9, weight decay added to the
gradient before momentum and applied to conv and dense kernels only, and a piecewise-constant
learning rate (CIFAR: 0.1, x0.1 at 40k and 60k steps, 80k steps at batch 100; ImageNet: 0.1, x0.1
at 160k, 320k and 480k steps, 600k steps at batch 256, weight decay 1e-4).

Data parallelism: a `jax.sharding.Mesh` over every device (all processes), the batch sharded
along its ``"data"`` axis and the parameters replicated (`revjax.train.inputs`).

Modules: `config` (`TrainConfig` and its validation table), `optim` (optimizers and schedules),
`steps` (model, state, train and evaluation steps), `inputs` (mesh and input pipelines),
`report` (metrics, memory report, progress), `record` (the config record each checkpoint
carries), `loop` (`train_and_evaluate`).

Typical use::

    from revjax.train import TrainConfig, train_and_evaluate
    train_and_evaluate(TrainConfig(model="revnet38", dataset="digits", num_steps=400), "/tmp/w")
"""

from revjax._resilience import CheckpointMismatchError as CheckpointMismatchError
from revjax._resilience import DamagedCheckpointWarning as DamagedCheckpointWarning
from revjax._resilience import NoReadableCheckpointError as NoReadableCheckpointError
from revjax._resilience import Preempted as Preempted
from revjax.train.config import CROSS_CHECKS as CROSS_CHECKS
from revjax.train.config import FIELD_CHECKS as FIELD_CHECKS
from revjax.train.config import ConfigError as ConfigError
from revjax.train.config import TrainConfig as TrainConfig
from revjax.train.config import validate_config as validate_config
from revjax.train.inputs import DATA_AXIS as DATA_AXIS
from revjax.train.inputs import INPUT_PIPELINES as INPUT_PIPELINES
from revjax.train.inputs import check_batch_size as check_batch_size
from revjax.train.inputs import make_eval_input as make_eval_input
from revjax.train.inputs import make_mesh as make_mesh
from revjax.train.inputs import make_train_input as make_train_input
from revjax.train.inputs import maybe_initialize_distributed as maybe_initialize_distributed
from revjax.train.inputs import resolve_input_pipeline as resolve_input_pipeline
from revjax.train.loop import NonFiniteLossError as NonFiniteLossError
from revjax.train.loop import train_and_evaluate as train_and_evaluate
from revjax.train.optim import LR_SCHEDULES as LR_SCHEDULES
from revjax.train.optim import OPTIMIZERS as OPTIMIZERS
from revjax.train.optim import adamw as adamw
from revjax.train.optim import cosine_decay as cosine_decay
from revjax.train.optim import learning_rate_schedule as learning_rate_schedule
from revjax.train.optim import make_optimizer as make_optimizer
from revjax.train.optim import piecewise_constant as piecewise_constant
from revjax.train.optim import sgd as sgd
from revjax.train.optim import warmup_schedule as warmup_schedule
from revjax.train.optim import weight_decay_mask as weight_decay_mask
from revjax.train.optim import with_warmup as with_warmup
from revjax.train.record import ConfigChangedWarning as ConfigChangedWarning
from revjax.train.report import MetricWriter as MetricWriter
from revjax.train.report import format_memory_report as format_memory_report
from revjax.train.report import train_step_memory as train_step_memory
from revjax.train.steps import TrainState as TrainState
from revjax.train.steps import abstract_train_state as abstract_train_state
from revjax.train.steps import build_model as build_model
from revjax.train.steps import create_train_state as create_train_state
from revjax.train.steps import cross_entropy as cross_entropy
from revjax.train.steps import evaluate as evaluate
from revjax.train.steps import make_eval_step as make_eval_step
from revjax.train.steps import make_train_step as make_train_step
from revjax.train.steps import model_presets as model_presets
from revjax.train.steps import step_options as step_options

__all__ = [
    "CheckpointMismatchError",
    "ConfigChangedWarning",
    "ConfigError",
    "DamagedCheckpointWarning",
    "NoReadableCheckpointError",
    "NonFiniteLossError",
    "Preempted",
    "TrainConfig",
    "TrainState",
    "abstract_train_state",
    "create_train_state",
    "cross_entropy",
    "evaluate",
    "learning_rate_schedule",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "warmup_schedule",
    "train_and_evaluate",
    "train_step_memory",
    "weight_decay_mask",
]

"""The training recipe and loop: one trainer for every experiment.

The paper's recipe (the RevNet authors' configs): SGD with momentum 0.9, weight decay added to the
gradient before momentum and applied to conv and dense kernels only, and a piecewise-constant
learning rate (CIFAR: 0.1, x0.1 at 40k and 60k steps, 80k steps at batch 100; ImageNet: 0.1, x0.1
at 160k, 320k and 480k steps, 600k steps at batch 256, weight decay 1e-4).

Devices: a `jax.sharding.Mesh` over every device (all processes) with ``data``, ``fsdp`` and
``tensor`` axes (`TrainConfig.mesh`; pure data parallelism by default), the batch split over
``data x fsdp`` (`revjax.train.inputs`) and the parameters and optimizer state placed by one
table of sharding rules per model family (`revjax.train.sharding`).

Modules: `config` (`TrainConfig` and its validation table), `optim` (optimizers and schedules),
`steps` (model, state, train and evaluation steps), `inputs` (mesh and input pipelines),
`sharding` (where each parameter lives on the mesh),
`report` (metrics, memory report, progress), `record` (the config record each checkpoint
carries), `loop` (`train_and_evaluate`).

Typical use::

    from revjax.train import TrainConfig, train_and_evaluate
    train_and_evaluate(TrainConfig(model="revnet38", dataset="digits", num_steps=400), "/tmp/w")
"""

from revjax.train.config import ConfigError as ConfigError
from revjax.train.config import TrainConfig as TrainConfig
from revjax.train.inputs import make_mesh as make_mesh
from revjax.train.loop import NonFiniteLossError as NonFiniteLossError
from revjax.train.loop import train_and_evaluate as train_and_evaluate
from revjax.train.optim import learning_rate_schedule as learning_rate_schedule
from revjax.train.optim import make_optimizer as make_optimizer
from revjax.train.optim import warmup_schedule as warmup_schedule
from revjax.train.optim import weight_decay_mask as weight_decay_mask
from revjax.train.record import ConfigChangedWarning as ConfigChangedWarning
from revjax.train.report import train_step_memory as train_step_memory
from revjax.train.resilience import CheckpointMismatchError as CheckpointMismatchError
from revjax.train.resilience import DamagedCheckpointWarning as DamagedCheckpointWarning
from revjax.train.resilience import NoReadableCheckpointError as NoReadableCheckpointError
from revjax.train.resilience import Preempted as Preempted
from revjax.train.sharding import Placement as Placement
from revjax.train.sharding import create_sharded_train_state as create_sharded_train_state
from revjax.train.sharding import family_rules as family_rules
from revjax.train.sharding import plan_params as plan_params
from revjax.train.sharding import train_state_shardings as train_state_shardings
from revjax.train.steps import TrainState as TrainState
from revjax.train.steps import abstract_train_state as abstract_train_state
from revjax.train.steps import abstract_train_step as abstract_train_step
from revjax.train.steps import create_train_state as create_train_state
from revjax.train.steps import cross_entropy as cross_entropy
from revjax.train.steps import evaluate as evaluate
from revjax.train.steps import make_eval_step as make_eval_step
from revjax.train.steps import make_train_step as make_train_step

__all__ = [
    "CheckpointMismatchError",
    "ConfigChangedWarning",
    "ConfigError",
    "DamagedCheckpointWarning",
    "NoReadableCheckpointError",
    "NonFiniteLossError",
    "Placement",
    "Preempted",
    "TrainConfig",
    "TrainState",
    "abstract_train_state",
    "abstract_train_step",
    "create_sharded_train_state",
    "create_train_state",
    "cross_entropy",
    "evaluate",
    "family_rules",
    "learning_rate_schedule",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "plan_params",
    "train_and_evaluate",
    "train_state_shardings",
    "train_step_memory",
    "warmup_schedule",
    "weight_decay_mask",
]

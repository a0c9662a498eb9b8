"""Run by .ci/run in a clean venv holding only the built wheel (not editable) and its
dependencies: import revjax, build a RevNet, two training steps through the public API."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import revjax
from revjax import finetune, pretrained, train  # the subpackages ship in the wheel

assert "site-packages" in revjax.__file__, f"not the installed wheel: {revjax.__file__}"
assert callable(pretrained.load_timm) and callable(finetune.scale_by_layer_decay)
model = revjax.revnet_tiny(10, rngs=nnx.Rngs(0), in_channels=1)
assert isinstance(model, revjax.RevNet) and revjax.count_params(model) > 0

config = train.TrainConfig(model="revnet_tiny", dataset="digits", batch_size=8, lr_boundaries=())
graphdef, state, tx = train.create_train_state(config, num_classes=10, in_channels=1)
step = jax.jit(train.make_train_step(graphdef, tx))
rng = np.random.default_rng(0)
batch = {
    "image": jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32),
    "label": jnp.asarray(rng.integers(0, 10, size=8), jnp.int32),
}
losses = []
for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
assert int(state.step) == 2 and all(np.isfinite(losses)), losses
print(f"wheel OK: revjax {revjax.__version__} from {revjax.__file__}; two steps, losses {losses}")

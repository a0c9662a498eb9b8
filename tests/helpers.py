"""What several test files share (the suite's own helpers; tests never import a benchmark's)."""

from __future__ import annotations

from revjax.train import TrainConfig

# A tiny RevNet on digits: two stages of two units (one transition + one reversible unit each).
TINY = TrainConfig(
    model="revnet_tiny",
    dataset="digits",
    batch_size=16,
    eval_batch_size=100,
    num_steps=3,
    lr_boundaries=(1000,),
    log_every=1,
    memory_report=False,
    num_devices=1,
)

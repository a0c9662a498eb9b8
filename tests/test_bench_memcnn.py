"""The MemCNN comparison's PyTorch network (`experiments.bench_memcnn`): the same architecture
as `revjax.RevNet`, and MemCNN's memory saving giving its plain gradients. Skipped without
torch and memcnn (the `benchmark` extra). The timed run itself is a benchmark, not a test."""

import warnings

import pytest
from flax import nnx

import revjax
from experiments import bench_memcnn

_PEER = "MemCNN (PyTorch) is the compared peer: make test-all (pip install -e '.[test-all]')"
torch = pytest.importorskip("torch", reason=_PEER)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # memcnn's torch.cuda.amp decorators
    memcnn = pytest.importorskip("memcnn", reason=_PEER)

# memcnn frees and refills tensors through the deprecated Tensor.storage().
pytestmark = pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")


@pytest.mark.parametrize(
    "units, widths", [((2, 2), (8, 8, 16)), ((3, 3, 3), (32, 32, 64, 112))], ids=["tiny", "38"]
)
def test_torch_revnet_mirrors_revjax(units, widths):
    model, wrappers = bench_memcnn.torch_revnet(torch, memcnn, units, widths)
    rev = nnx.eval_shape(
        lambda: revjax.RevNet(units_per_stage=units, widths=widths, rngs=nnx.Rngs(0))
    )
    assert sum(p.numel() for p in model.parameters()) == revjax.count_params(rev)
    assert len(wrappers) == sum(u - 1 for u in units)
    logits = model(torch.randn(2, 3, 8, 8))
    assert logits.shape == (2, 10)


def test_memcnn_reversible_gradients_equal_plain():
    torch.manual_seed(0)
    model, wrappers = bench_memcnn.torch_revnet(torch, memcnn, (3, 2), (8, 8, 16))
    images, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    error = bench_memcnn.memcnn_gradient_error(torch, model, wrappers, images, labels)
    assert error < 1e-10  # float64
    assert all(not w.disable for w in wrappers)  # memory saving back on

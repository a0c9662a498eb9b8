"""Input pipelines: TFDS CIFAR-10/100 and ImageNet, plus scikit-learn's digits offline.

One module per concern:

- `revjax.data.sources`: dataset descriptions, random-access sources, the CIFAR mean image.
- `revjax.data.transforms`: the per-example numpy transforms (the reference augmentation).
- `revjax.data.device_pipeline`: datasets that fit in device memory (CIFAR, digits) live there
  as uint8 arrays; the per-epoch shuffle and the augmentation run inside the jitted train step,
  keyed by (seed, step). The trainer's default for them.
- `revjax.data.grain_pipeline`: Grain datasets and checkpointable iterators, worker processes,
  device prefetch. An option for every dataset.
- `revjax.data.imagenet`: ImageNet through Grain: JPEGs decoded at reduced scale into uint8
  crops on the host (`revjax.data.imagenet_decode`); flip, colour jitter and scaling inside the
  jitted train step (`revjax.data.imagenet_augment`).

Reading never imports TensorFlow: TFDS data are read with `tfds.data_source(...,
download=False)` from ArrayRecord files that `python -m revjax.prepare` wrote once (that step
needs TensorFlow, the `revjax[prepare]` extra).

Typical use::

    info = get_dataset_info("cifar10")
    train_it = train_iterator("cifar10", batch_size=128, seed=0, data_dir=data_dir)
    batch = next(train_it)          # {"image": float32[128, 32, 32, 3], "label": int32[128]}
    state = train_it.get_state()    # store in the checkpoint (a small JSON-able dict)
    train_it.set_state(state)       # on restore, on a freshly built iterator
    for batch in eval_iterator("cifar10", batch_size=500, data_dir=data_dir):
        ...                         # batch["mask"] is 0.0 on padding rows

    # Device-resident: the batch of step k, computed on the devices.
    mesh = jax.sharding.Mesh(jax.devices(), ("data",))
    inp = DeviceTrainInput("cifar10", batch_size=128, seed=0, data_dir=data_dir,
                           batch_sharding=NamedSharding(mesh, P("data")))
    batch = inp.batch_at(0)
"""

from revjax.data.device_pipeline import DEVICE_DATASETS as DEVICE_DATASETS
from revjax.data.device_pipeline import AugmentSpec as AugmentSpec
from revjax.data.device_pipeline import DeviceEvalInput as DeviceEvalInput
from revjax.data.device_pipeline import DeviceTrainInput as DeviceTrainInput
from revjax.data.device_pipeline import augment_spec as augment_spec
from revjax.data.device_pipeline import draw_augmentation as draw_augmentation
from revjax.data.device_pipeline import epoch_permutation as epoch_permutation
from revjax.data.device_pipeline import fits_on_devices as fits_on_devices
from revjax.data.device_pipeline import load_split as load_split
from revjax.data.device_pipeline import transform_batch as transform_batch
from revjax.data.grain_pipeline import DevicePrefetcher as DevicePrefetcher
from revjax.data.grain_pipeline import GrainTrainInput as GrainTrainInput
from revjax.data.grain_pipeline import eval_dataset as eval_dataset
from revjax.data.grain_pipeline import eval_iterator as eval_iterator
from revjax.data.grain_pipeline import global_batch as global_batch
from revjax.data.grain_pipeline import train_dataset as train_dataset
from revjax.data.grain_pipeline import train_iterator as train_iterator
from revjax.data.imagenet import ImageNetTrainInput as ImageNetTrainInput
from revjax.data.sources import KNOWN_DATASETS as KNOWN_DATASETS
from revjax.data.sources import TFDS_DATASETS as TFDS_DATASETS
from revjax.data.sources import DatasetInfo as DatasetInfo
from revjax.data.sources import DatasetNotPreparedError as DatasetNotPreparedError
from revjax.data.sources import DigitsSource as DigitsSource
from revjax.data.sources import digits_arrays as digits_arrays
from revjax.data.sources import get_dataset_info as get_dataset_info
from revjax.data.sources import make_source as make_source
from revjax.data.sources import mean_image as mean_image
from revjax.data.sources import prepare_command as prepare_command
from revjax.data.transforms import PIXEL_SCALE as PIXEL_SCALE
from revjax.data.transforms import cifar_eval_transform as cifar_eval_transform
from revjax.data.transforms import cifar_train_transform as cifar_train_transform
from revjax.data.transforms import imagenet_augment_reference as imagenet_augment_reference
from revjax.data.transforms import imagenet_eval_transform as imagenet_eval_transform
from revjax.data.transforms import imagenet_train_transform as imagenet_train_transform

__all__ = [
    "DEVICE_DATASETS",
    "AugmentSpec",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "DeviceEvalInput",
    "DevicePrefetcher",
    "DeviceTrainInput",
    "DigitsSource",
    "GrainTrainInput",
    "ImageNetTrainInput",
    "KNOWN_DATASETS",
    "PIXEL_SCALE",
    "TFDS_DATASETS",
    "augment_spec",
    "cifar_eval_transform",
    "cifar_train_transform",
    "digits_arrays",
    "draw_augmentation",
    "epoch_permutation",
    "eval_dataset",
    "eval_iterator",
    "fits_on_devices",
    "get_dataset_info",
    "global_batch",
    "imagenet_augment_reference",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "load_split",
    "make_source",
    "mean_image",
    "prepare_command",
    "train_dataset",
    "train_iterator",
    "transform_batch",
]

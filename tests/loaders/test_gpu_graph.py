"""Every DALI pipeline the data config can produce, defined for ``device: gpu`` on any machine.

DALI checks operator placement (named arguments on the CPU, inputs on a device the operator
accepts, argument names and types) while the graph is defined, before it needs a GPU. So on a
machine without CUDA each GPU variant must define cleanly and fail only at ``build()``, for want of
CUDA; with a GPU (``make gpu-check``) the same test builds it and runs a batch on the GPU.

Besides DALI's own checks, the GPU graph must be the CPU graph with other devices: the same
operators in the same order, the same arguments, layouts and dtypes (a named argument, layout or
dtype only the GPU graph uses is a failure), the decoder on ``mixed`` and every image operator after
it on the GPU. Each CPU variant also runs one real batch, so the shared definition is a working one.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from flora.loaders.config import load_data_config
from flora.loaders.dali import HAVE_DALI

pytestmark = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")

CUDA_ABSENT = "CUDA is not available"
#: Operators that read a GPU tensor's shape give a CPU value: they are not image operators.
SHAPE_OPS = {"Shapes", "_Shape"}
#: Spec lines that legitimately differ between the devices (the device itself, where it was defined,
#: the id of a python_function's registered callable: one per pipeline).
DEVICE_LINES = re.compile(r"^\s*(device|_origin_\w+|function_id):")

NO_COLOR = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
AUGMENTS = {
    "full": {},
    "none": {"rotate_degrees": 0.0, "hflip": 0.0, **NO_COLOR},
    "no_rotation": {"rotate_degrees": 0.0},
    "no_color": NO_COLOR,
    "no_flip": {"hflip": 0.0},
    "brightness_only": {**NO_COLOR, "brightness": 0.3},
    "contrast_only": {**NO_COLOR, "contrast": 0.3},
    "saturation_only": {**NO_COLOR, "saturation": 0.3},
    "hue_only": {**NO_COLOR, "hue": 0.05},
    "whole_image": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]},
}
DECODERS = {
    "dali_defaults": {},
    "no_hw_decoder": {"hw_decoder_load": 0.0},
    "tuned": {
        "hw_decoder_load": 0.9,
        "device_memory_padding": 64 * 1024 * 1024,
        "host_memory_padding": 32 * 1024 * 1024,
        "preallocate_width_hint": 500,
        "preallocate_height_hint": 500,
        "jpeg_fancy_upsampling": True,
    },
}
FORMATS = list(itertools.product(["float32", "float16"], [False, True]))  # dtype, channels_last

VARIANTS = (
    [("train", aug, "dali_defaults", dt, cl) for aug in AUGMENTS for dt, cl in FORMATS]
    + [("val", "full", "dali_defaults", dt, cl) for dt, cl in FORMATS]
    + [(split, "full", dec, "float32", False) for split in ("train", "val") for dec in list(DECODERS)[1:]]
    + [("replay", aug, "dali_defaults", "float32", False) for aug in ("full", "none", "no_rotation")]
    + [("replay", "full", "tuned", dt, cl) for dt, cl in FORMATS]
)  # fmt: skip
#: Each split's (train, replay) flags; "replay": a stored view (loaders/views.py), whole image, flipped.
SPLITS = {"train": (True, False), "val": (False, False), "replay": (True, True)}


def whole_image(sources, shapes):
    """A stored-view row per sample ([x0, y0, w, h, flip, angle, b, c, s, hue]): the whole image."""
    return [np.array([0, 0, s[1], s[0], 1, 5.0, 1.1, 0.9, 1.0, 3.0], np.float32) for s in shapes]


def config(shards, augment: str, decoder: str, dtype: str, channels_last: bool):
    data = {
        "shards": str(shards),
        "image_size": 64,
        "batch_size": 4,
        "threads": 1,
        "shuffle_buffer": 8,
        "dtype": dtype,
        "channels_last": channels_last,
        "augment": AUGMENTS[augment],
        "decoder": DECODERS[decoder],
    }
    return load_data_config({"data": data})


def define(cfg, train: bool, tars: list[str], gpu: bool, replay=None):
    from flora.loaders.dali import define_pipeline

    pipe = define_pipeline(
        cfg,
        train,
        tars,
        [t[:-4] + ".idx" for t in tars],
        shard_id=0,
        num_shards=1,
        gpu=gpu,
        device_id=0 if gpu else None,
        seed=3,
        replay=replay,
    )
    pipe._build_graph()  # the Python graph definition, where DALI checks placement (build() calls it)
    return pipe


def signature(pipe) -> list[str]:
    """Each operator's spec (type, inputs, arguments) with device names taken out."""
    out = []
    for op in pipe._ops:
        lines = [ln for ln in str(op.spec).splitlines() if not DEVICE_LINES.match(ln)]
        out.append(re.sub(r"_(cpu|gpu)\b", "", "\n".join(lines)))
    return out


def image_ops(pipe) -> list[int]:
    """Positions of the operators that carry image data: the decoder and everything fed by it
    through a regular input (argument inputs and shape reads excluded)."""
    producers = {}
    for i, op in enumerate(pipe._ops):
        for out in op.outputs:
            producers[out.name] = i
    carrying: list[int] = []
    for i, op in enumerate(pipe._ops):
        schema = op._op._schema.Name()
        regular = op._inputs[: op.spec.NumRegularInput()]
        if schema.startswith("decoders__") or (
            schema not in SHAPE_OPS and any(producers.get(x.name) in carrying for x in regular)
        ):
            carrying.append(i)
    return carrying


@pytest.fixture(scope="module")
def tars(shard_root) -> list[str]:
    return sorted(str(p) for p in (shard_root / "train").glob("*/*.tar"))[:2]


@pytest.mark.parametrize(("split", "augment", "decoder", "dtype", "channels_last"), VARIANTS)
def test_gpu_graph_defines_as_the_cpu_graph(tars, shard_root, split, augment, decoder, dtype, channels_last):
    cfg = config(shard_root, augment, decoder, dtype, channels_last)
    train, replay = SPLITS[split]
    replay = whole_image if replay else None
    cpu = define(cfg, train, tars, gpu=False, replay=replay)
    gpu = define(cfg, train, tars, gpu=True, replay=replay)  # a definition error (placement, ...) raises here

    assert signature(gpu) == signature(cpu)  # one definition: same ops, arguments, layouts, dtypes
    carrying = image_ops(cpu)
    assert carrying == image_ops(gpu) and len(carrying) >= 3  # decoder, resize/warp, normalize at least
    devices = [gpu._ops[i]._op._device for i in carrying]
    assert devices[0] == "mixed" and set(devices[1:]) == {"gpu"}, devices
    others = {op._op._device for i, op in enumerate(gpu._ops) if i not in carrying}
    assert others == {"cpu"}  # reader, random draws, warp matrix, source_info: CPU values
    assert {op._op._device for op in cpu._ops} == {"cpu"}

    layout = "HWC" if channels_last else "CHW"
    cpu.build()
    images, source = cpu.run()
    batch = np.stack([np.asarray(images.at(i)) for i in range(len(images))])
    channel_axis = -1 if channels_last else 1
    assert batch.shape[channel_axis] == 3 and images.layout() == layout
    assert batch.dtype == (np.float16 if dtype == "float16" else np.float32)

    if torch.cuda.is_available():  # on a GPU machine the same variant runs for real
        gpu.build()
        g_images, _ = gpu.run()
        g = np.stack([np.asarray(g_images.as_cpu().at(i)) for i in range(len(g_images))])
        assert g.shape == batch.shape and g.dtype == batch.dtype and g_images.layout() == layout
    else:
        with pytest.raises(RuntimeError, match=CUDA_ABSENT):
            gpu.build()


def test_a_gpu_only_argument_would_be_caught(tars, shard_root):
    """The signature comparison is not vacuous: a graph that differs on the GPU is told apart."""
    cfg = config(shard_root, "full", "dali_defaults", "float32", False)
    cpu = define(cfg, True, tars, gpu=False)
    cfg.augment.mean = [0.5, 0.5, 0.5]  # as if the GPU branch normalised differently
    gpu = define(cfg, True, tars, gpu=True)
    assert signature(gpu) != signature(cpu)


def test_the_named_argument_rule_is_enforced_at_definition(tars):
    """The bug this file guards against: a GPU tensor as a named argument fails at definition."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        jpg = fn.readers.webdataset(
            paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg"], dtypes=[types.UINT8]
        )
        images = fn.decoders.image(jpg, device="mixed")
        matrix = fn.constant(fdata=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], shape=[2, 3], dtype=types.FLOAT).gpu()
        return fn.warp_affine(images, device="gpu", matrix=matrix, size=[8, 8])

    with pytest.raises(ValueError, match="Named arguments must be on CPU"):
        pipe(batch_size=2, num_threads=1, device_id=0)._build_graph()


def test_decoder_defaults_are_dalis_own():
    """``data.decoder``'s defaults are the values NVIDIA ships in DALI's decoder schema."""
    from nvidia.dali import backend

    from flora.loaders.config import DecoderConfig

    schema = backend.GetSchema("decoders__ImageRandomCrop")
    for key, value in DecoderConfig().dali_args().items():
        default = schema.GetArgumentDefaultValueString(key)
        assert type(value)(float(default) if default not in ("True", "False") else default == "True") == value

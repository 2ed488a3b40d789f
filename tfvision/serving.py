"""The serving graph and its conversion to ONNX and TFLite.

`ServingModule` wraps a trained Keras model (logits out) into the graph every
export ships: uint8 images [N, H, W, C] at any size in; resize to the run's
image size, normalisation (the model's own `ImageNormalization` layer),
backbone, head, temperature and the task's activation and decision rule inside
(`tfvision.tasks.outputs`); the task's outputs (``probabilities`` and ``labels``) out. A second function takes encoded JPEG/PNG bytes and decodes
them with the training pipeline's own `decode_resized` (magic bytes, DCT
downscaling). Dense (per-pixel) models answer at the input's own H x W
(`logits_at_input_size`), except through the bytes signature, whose batch of
differently sized files shares the run's image size.

The converters get a *frozen, flattened* GraphDef of that function
(`freeze`), never the Keras model, because of three failures with
TensorFlow 2.21, Keras 3.15 and tf2onnx 1.17 (each fixed where it occurs):

1. Keras 3's TF backend runs grouped convolutions (ConvNeXt's "depthwise"
   ``Conv2D(groups=C)``) inside a ``tf.function(jit_compile=True)`` because TF
   has no CPU kernel for them. The traced graph holds a
   ``StatefulPartitionedCall`` marked ``_XlaMustCompile``/``_noinline`` that
   grappler refuses to inline; tf2onnx then reports "Tensorflow op
   [...depthwise_conv_1/StatefulPartitionedCall] is not supported" and ONNX
   Runtime rejects the model ("No Op registered for StatefulPartitionedCall").
   Fix: drop those two attributes from the frozen GraphDef and inline with
   grappler; the grouped ``Conv2D`` left behind converts natively (ONNX
   ``Conv(group=C)``, TFLite ``CONV_2D`` with a [C, kh, kw, 1] filter).
2. TFLite's converter keeps Keras 3 variables as resource variables
   (``VAR_HANDLE``/``READ_VARIABLE``) with nothing to initialise them: a 4.7 MB
   model becomes a 31 KB flatbuffer that outputs NaN, with no error
   (``from_concrete_functions`` and ``from_saved_model`` alike). Fix: convert
   the frozen graph (variables folded into constants).
3. Exact GELU (ConvNeXt) is ``0.5 * x * erfc(-x / sqrt(2))`` in TF 2.21 and
   tf2onnx 1.17 has no ``Erfc`` handler. Fix (ONNX only): convert ``Erfc(y)``
   to ``1 - Erf(y)``, exact up to float32 rounding (< 1e-6 after the GELU
   product). TFLite needs no fix: it fuses the ``Erfc`` pattern into its
   ``GELU`` builtin, and rewriting it first would break that fusion.

(The fourth known failure, Keras ``Normalization`` constants becoming missing
ONNX inputs, does not occur: tfvision models normalise with
`ImageNormalization`, whose constants are Python lists baked into the graph.)

One rewrite is for speed, not correctness: tf2onnx 1.17 leaves the input
normalisation in NHWC order, where ONNX Runtime 1.31 broadcasts slowly
(`_per_channel_ops_after_transpose`).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import tensorflow as tf

from tfvision.data.decode import decode_resized

# Conservative default: opset 17 loads in ONNX Runtime >= 1.13 and most other runtimes.
ONNX_OPSET = 17


def logits_at_input_size(model, images, image_size):
    """The model on float images [N, H, W, C] of any size: resized to `image_size` (bilinear, as
    the pipeline resizes), and dense (per-pixel) logits resized back to H x W, bilinearly and
    before any softmax or argmax, so that a mask lines up with the image it came from.

    One rule for every consumer of a dense model at the input's size: the exported graphs,
    their verification, and ``predict --volume`` (`tfvision.medical.volume_inference`).
    """
    logits = model(resized(images, image_size), training=False)
    logits = logits[0] if isinstance(logits, (list, tuple)) else logits  # deep supervision: main output
    if logits.shape.rank == 4 and tuple(logits.shape[1:3]) != tuple(images.shape[1:3]):
        logits = tf.image.resize(logits, tf.shape(images)[1:3])
    return logits


def resized(images, image_size):
    """`images` resized (bilinear) to `image_size`, unless their static shape already has that size
    (the bytes signature's decoded batch): the resize would be an exact copy."""
    if tuple(images.shape[1:3]) == tuple(image_size):
        return images
    return tf.image.resize(images, image_size)


class ServingModule(tf.Module):
    """uint8 images (any size) or encoded bytes -> the task's outputs (probabilities and labels).

    >>> module = ServingModule(model, image_size=(224, 224), channels=3, output=Softmax(),
    ...                        class_names=["benign", "malignant"])
    >>> module.serve(tf.zeros([2, 480, 640, 3], tf.uint8))["probabilities"].shape
    TensorShape([2, K])

    Args:
        model: Keras model, float image on the 0..255 scale in, logits out
            (normalisation is a layer of the model).
        image_size: (H, W) the model was trained at; inputs are resized to it.
        channels: image channels.
        output: the task's `tfvision.tasks.outputs.Output` (activation, decision, output names).
        class_names: the run's classes (run.json), for the decision rule.
        temperature: fitted temperature; logits are divided by it.
        decision: the run's thresholds.json (see `Output.rule`), or None.
    """

    def __init__(self, model, *, image_size, channels: int, output, class_names: list[str],
                 temperature: float = 1.0, decision: dict | None = None):
        super().__init__(name="tfvision_serving")
        # Only the variables are saved, not the Keras object graph: the SavedModel then loads
        # in about half the time and needs no Keras (or tfvision) to run.
        self._keras = _Untracked(model)
        self.model_variables = [getattr(v, "value", v) for v in model.variables]
        self.image_size = tuple(int(s) for s in image_size)
        self.channels = int(channels)
        self.output = _Untracked(output)
        self.temperature = float(temperature)
        self.rule = _Untracked(output.rule(decision, list(class_names)))
        self.serve = tf.function(self._serve, input_signature=[
            tf.TensorSpec([None, None, None, self.channels], tf.uint8, name="image")])
        self.serve_bytes = tf.function(self._serve_bytes, input_signature=[
            tf.TensorSpec([None], tf.string, name="image_bytes")])

    @property
    def model(self):
        return self._keras.obj

    def _serve(self, image):
        return self.output.obj.serve_images(self.model, tf.cast(image, tf.float32), self.image_size,
                                            self.temperature, self.rule.obj)

    def _serve_bytes(self, image_bytes):
        size = self.image_size

        def one(data):
            # Exactly the evaluation pipeline: decode by magic bytes, then resize.
            return decode_resized(data, self.channels, size)

        images = tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec(
            [size[0], size[1], self.channels], tf.float32))
        return self.output.obj.serve_images(self.model, images, size, self.temperature, self.rule.obj)


class _Untracked:
    """A plain holder: tf.Module does not track what is inside it."""

    def __init__(self, obj):
        self.obj = obj


# --------------------------------------------------------------------------- freezing


@dataclasses.dataclass
class FrozenGraph:
    """A self-contained GraphDef: constants instead of variables, no nested functions."""

    graph_def: tf.compat.v1.GraphDef
    inputs: dict[str, str]  # name -> tensor name ("image" -> "image:0")
    outputs: dict[str, str]  # name -> tensor name ("probabilities" -> "Identity_1:0")
    input_signature: list[tf.TensorSpec]


_NO_INLINE_ATTRS = ("_XlaMustCompile", "_noinline")


def freeze(fn: tf.types.experimental.ConcreteFunction) -> FrozenGraph:
    """Fold variables into constants and inline every function call (see failures 1 and 2)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(fn, lower_control_flow=False, aggressive_inlining=True)
    graph_def = frozen.graph.as_graph_def()
    # Failure 1: Keras wraps grouped convolutions in jit_compile functions that grappler never
    # inlines. XLA is only a CPU-kernel workaround in TF; the converters have their own kernels.
    for node in graph_def.node:
        for attr in _NO_INLINE_ATTRS:
            if attr in node.attr:
                del node.attr[attr]
    for function in graph_def.library.function:
        for attr in _NO_INLINE_ATTRS:
            if attr in function.attr:
                del function.attr[attr]
    signature = [s for s in tf.nest.flatten(fn.structured_input_signature) if isinstance(s, tf.TensorSpec)]
    inputs = {s.name: t.name for s, t in zip(signature, frozen.inputs, strict=True)}
    # The frozen function returns a flat list, in tf.nest order of the original dict: sorted keys.
    if not isinstance(fn.structured_outputs, dict):
        raise TypeError("freeze() needs a function that returns a dict of named tensors")
    keys = sorted(fn.structured_outputs)
    outputs = {k: t.name for k, t in zip(keys, frozen.outputs, strict=True)}
    graph_def = _inline(graph_def, list(inputs.values()) + list(outputs.values()))
    # Functions may stay as the bodies of control flow (While, If: Mask R-CNN's batched proposal
    # NMS), which both converters read; a call left uninlined is failure 1 again.
    called = [n for n in graph_def.node if n.op.endswith("PartitionedCall")]
    called += [n for f in graph_def.library.function for n in f.node_def if n.op.endswith("PartitionedCall")]
    if called:
        raise RuntimeError("could not inline every function of the serving graph (left: "
                           f"{sorted({n.op for n in called})})")
    return FrozenGraph(graph_def, inputs, outputs, signature)


def _inline(graph_def, keep: list[str]):
    """Grappler's function inlining and constant folding on a GraphDef."""
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
    from tensorflow.python.grappler import tf_optimizer

    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.optimizers[:] = ["function", "constfold", "dependency"]
    with tf.Graph().as_default():  # export_meta_graph refuses to run eagerly
        meta_graph = tf.compat.v1.train.export_meta_graph(graph_def=graph_def)
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(keep)
    meta_graph.collection_def["train_op"].CopyFrom(fetch)
    return tf_optimizer.OptimizeGraph(config, meta_graph)


def as_function(graph: FrozenGraph):
    """The frozen graph as a tf.function with the original named inputs and outputs."""
    wrapped = tf.compat.v1.wrap_function(
        lambda: tf.compat.v1.import_graph_def(graph.graph_def, name=""), [])
    names = list(graph.outputs)
    pruned = wrapped.prune(feeds=[wrapped.graph.get_tensor_by_name(t) for t in graph.inputs.values()],
                           fetches=[wrapped.graph.get_tensor_by_name(graph.outputs[k]) for k in names])

    @tf.function(input_signature=graph.input_signature)
    def fn(*args):
        return dict(zip(names, pruned(*args), strict=True))

    return fn


class _Holder(tf.Module):
    """Owns a function for TFLite's converter (without a trackable owner it takes a deprecated
    path that writes no signature, so the interpreter has no named inputs and outputs)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn


# --------------------------------------------------------------------------- ONNX


def _erfc_to_erf(ctx, node, name, args):
    """tf2onnx handler, failure 3: Erfc(y) = 1 - Erf(y) (ONNX has Erf, not Erfc)."""
    del args
    dtype = ctx.get_dtype(node.input[0])
    one = ctx.make_const(f"{name}/one", np.array(1.0, _onnx_to_numpy(dtype)))
    erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=name)
    shapes, dtypes = node.output_shapes, node.output_dtypes
    ctx.remove_node(node.name)
    ctx.make_node("Sub", [one.output[0], erf.output[0]], outputs=[node.output[0]], name=name,
                  shapes=shapes, dtypes=dtypes)


def _onnx_to_numpy(onnx_dtype):
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(onnx_dtype)


def to_onnx(graph: FrozenGraph, metadata: dict | None = None, opset: int = ONNX_OPSET):
    """ONNX ModelProto of a frozen graph; inputs/outputs keep their names; metadata as metadata_props.

    Metadata values that are not strings are stored as JSON.
    """
    import onnx
    import tf2onnx

    rename = {t: k for k, t in {**graph.inputs, **graph.outputs}.items()}
    model, _ = tf2onnx.convert.from_graph_def(
        graph.graph_def, input_names=list(graph.inputs.values()), output_names=list(graph.outputs.values()),
        opset=opset, custom_op_handlers={"Erfc": (_erfc_to_erf, [])}, tensors_to_rename=rename)
    unknown = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx.ml")})
    if unknown:
        raise RuntimeError(f"tf2onnx left ops ONNX Runtime cannot run: {unknown}")
    _per_channel_ops_after_transpose(model)
    if metadata:
        onnx.helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v)
                                            for k, v in metadata.items()})
    onnx.checker.check_model(model)
    return model


_PER_CHANNEL_OPS = ("Sub", "Mul", "Add", "Div")
_NHWC_TO_NCHW = [0, 3, 1, 2]


def _per_channel_ops_after_transpose(model) -> None:
    """Run per-channel arithmetic on a graph input after tf2onnx's NHWC -> NCHW Transpose.

    tf2onnx 1.17 leaves the normalisation ``(x - mean) * (1 / std)`` of an NHWC input in
    front of the Transpose it inserts for the first convolution. ONNX Runtime 1.31 broadcasts
    a [C] constant over an innermost axis of 3 slowly: on EfficientNetV2-B0 at 224 px those
    two ops took 10.6% of the CPU time against 0.7% for the same ops on the NCHW tensor
    (its profiler, one thread). The rewrite is exact: the same float32 operations on the same
    values, in another memory order; the constants become [1, C, 1, 1]. It matches only a
    chain of such ops, each with a constant [C] operand and no other consumer, from a graph
    input into a Transpose with perm [0, 3, 1, 2], and leaves every other graph as it is.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {init.name: init for init in graph.initializer}
    for graph_input in graph.input:
        chain, tensor = [], graph_input.name
        while len(consumers.get(tensor, [])) == 1:
            node = consumers[tensor][0]
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                if perm == _NHWC_TO_NCHW and chain:
                    _move_after(graph, chain, node, graph_input.name, constants, helper, numpy_helper)
                break
            other = [i for i in node.input if i != tensor]
            if (node.op_type not in _PER_CHANNEL_OPS or list(node.input).index(tensor) != 0 or len(other) != 1
                    or other[0] not in constants or len(constants[other[0]].dims) != 1):
                break
            chain.append(node)
            tensor = node.output[0]


def _move_after(graph, chain, transpose, source, constants, helper, numpy_helper) -> None:
    out = transpose.output[0]
    transpose.input[0] = source
    transpose.output[0] = f"{source}__nchw"
    previous = transpose.output[0]
    for k, node in enumerate(chain):
        c = numpy_helper.to_array(constants[node.input[1]]).reshape(1, -1, 1, 1)
        name = f"{node.input[1]}__nchw"
        graph.initializer.append(numpy_helper.from_array(c, name))
        node.input[0], node.input[1] = previous, name
        node.output[0] = out if k == len(chain) - 1 else f"{node.output[0]}__nchw"
        previous = node.output[0]
    # Keep the node list topologically sorted: the transpose now runs first.
    nodes = [n for n in graph.node if n is not transpose and all(n is not c for c in chain)]
    first = min(i for i, n in enumerate(graph.node) if n is transpose or any(n is c for c in chain))
    ordered = nodes[:first] + [helper.make_node("Transpose", [source], [transpose.output[0]], perm=_NHWC_TO_NCHW,
                                                name=transpose.name)] + list(chain) + nodes[first:]
    del graph.node[:]
    graph.node.extend(ordered)
    used = {name for n in graph.node for name in n.input}
    kept = [init for init in graph.initializer if init.name in used or init.name not in constants]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def onnx_float16_weights(model, min_elements: int = 16):
    """Store float32 initializers as float16, each followed by a Cast back to float32.

    Halves the file; ONNX Runtime folds the casts when the session loads, so
    arithmetic stays float32 and only the weight rounding (about 3 significant
    digits) changes the outputs. Tiny constants (shapes, scalars) stay float32.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    casts, keep = [], []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            keep.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "__fp16")
        keep.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=init.name + "__to_fp32"))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


# --------------------------------------------------------------------------- TFLite


TFLITE_MODES = ("float32", "float16", "dynamic")


def to_tflite(graph: FrozenGraph, mode: str = "float32") -> bytes:
    """TFLite flatbuffer of a frozen graph (failure 2), builtin ops only.

    Modes: ``float32``; ``float16`` (float16 weights, dequantised at load);
    ``dynamic`` (dynamic-range quantisation: int8 weights, float activations).
    """
    if mode not in TFLITE_MODES:
        raise ValueError(f"unknown TFLite mode {mode!r}; one of {TFLITE_MODES}")
    holder = _Holder(as_function(graph))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([holder.fn.get_concrete_function()], holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def tflite_interpreter(path_or_bytes, num_threads: int | None = None):
    """A `tf.lite.Interpreter` without its deprecation warning (TF 2.21 points to ai_edge_litert,
    which is not a dependency); returns the interpreter and its serving signature runner."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
        kw = {"model_content": path_or_bytes} if isinstance(path_or_bytes, bytes) else {
            "model_path": str(path_or_bytes)}
        interpreter = tf.lite.Interpreter(**kw, num_threads=num_threads)
    return interpreter, interpreter.get_signature_runner()

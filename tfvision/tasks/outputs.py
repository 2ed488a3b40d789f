"""How a model's logits become answers: activation, decision rule, served outputs.

One object per kind of output, shared by every consumer so that they cannot
disagree: evaluate (temperature fitting, tuned rules), predict (labels and the
CSV's columns), and the exported graph (`serving.ServingModule`), whose
``--verify`` compares the float output named by `compared`.

The NumPy half (`activate`, `decide`) works in float64, as the metrics do; the
graph half (`serve`) is TensorFlow, imported when a graph is built, so that
config validation, which imports every task, never loads TensorFlow.
"""

from __future__ import annotations

import logging

import numpy as np

from tfvision import metrics as M

log = logging.getLogger(__name__)


class Output:
    """Logits [..., K] -> probabilities -> a decision; subclasses fill in the activation."""

    activation = "none"  # recorded in run.json and export.json for people and other tools
    compared = "probabilities"  # the float output `export --verify` compares with Keras

    def activate(self, logits, temperature: float = 1.0) -> np.ndarray:
        raise NotImplementedError

    def activate_graph(self, logits):
        """The same activation on a float32 tensor, inside the serving graph."""
        raise NotImplementedError

    def decide(self, probs: np.ndarray, decision: dict | None, class_names: list[str]) -> np.ndarray:
        """Apply the run's decision rule (thresholds.json; None: the default rule) to probabilities."""
        raise NotImplementedError

    def rule(self, decision: dict | None, class_names: list[str]) -> dict:
        """The decision rule the exported graph applies (what a per-request graph can do)."""
        raise NotImplementedError

    def serve(self, logits, temperature: float, rule: dict) -> dict:
        """Named output tensors of the serving graph, over the last axis of `logits`."""
        import tensorflow as tf

        logits = tf.cast(logits, tf.float32)
        if temperature != 1.0:
            logits = logits / temperature
        probs = self.activate_graph(logits)
        return {"probabilities": probs, "labels": self.labels_graph(probs, rule)}

    def labels_graph(self, probs, rule: dict):
        raise NotImplementedError

    def describe(self) -> dict:
        """export.json's description of each served output."""
        return {"probabilities": "float32 [N, K], or [N, H, W, K] for dense (per-pixel) models: the input's "
                                 "H and W (serve_bytes: the run's image size)",
                "labels": "int64: class index [N] (or [N, H, W])"}

    def agree(self, got: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Where an exported `compared` output gives the same answer as Keras (export's
        ``top1_agreement``; reported, not gated): the same top class, per image or per pixel."""
        return got.argmax(-1) == ref.argmax(-1)

    # ---- export: the serving graph and --verify -----------------------------------------------
    def serve_images(self, model, images, image_size, temperature: float, rule: dict) -> dict:
        """The serving graph's named outputs for float32 images [N, H, W, C] (0..255) at any size,
        run by the model at `image_size` (`serving.logits_at_input_size`: dense answers at H x W)."""
        from tfvision.serving import logits_at_input_size

        return self.serve(logits_at_input_size(model, images, image_size), temperature, rule)

    def split(self, outputs: dict) -> list:
        """A batch of served outputs (NumPy, by name) -> what `compare` compares, per image."""
        return list(np.asarray(outputs[self.compared], np.float32))

    def reference(self, model, images, image_size, temperature: float, rule: dict) -> list:
        """Keras's answers for a batch of images (uint8 or float, any size), per image, as `split`
        gives an exported artifact's."""
        import tensorflow as tf

        served = self.serve_images(model, tf.cast(images, tf.float32), image_size, temperature, rule)
        return self.split({k: v.numpy() for k, v in served.items()})

    def compare(self, got: list, ref: list, threshold: float) -> dict:
        """``--verify``'s verdict on one artifact, per image `got` against Keras's `ref`: report
        fields plus ``passed`` (max |p - p_keras| within `threshold`, all finite)."""
        wrong = next(((g.shape, r.shape) for g, r in zip(got, ref, strict=True) if g.shape != r.shape), None)
        if wrong:  # a failed export like any other: reported, and kept as OUTPUT.failed
            return {"max_abs_diff": None, "top1_agreement": None, "passed": False,
                    "error": f"output shape {wrong[0]}, Keras gives {wrong[1]}"}
        diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref, strict=True))
        # top-1 per image, or per pixel for dense outputs
        top1 = float(np.mean(np.concatenate([self.agree(g, r).ravel() for g, r in zip(got, ref, strict=True)])))
        return {"max_abs_diff": diff, "top1_agreement": top1,
                "passed": bool(all(np.isfinite(g).all() for g in got) and diff <= threshold)}

    def summary(self, result: dict) -> str:
        """One log line of `compare`'s result."""
        return f"max_abs_diff={result['max_abs_diff']:.3g} top1_agreement={result['top1_agreement']:.4f}"

    def label(self, decided, class_names: list[str]) -> str:
        """predict's ``pred`` column for one image."""
        return class_names[int(decided)]

    def columns(self, probs: np.ndarray, class_names: list[str]) -> dict[str, np.ndarray]:
        """predict's float columns."""
        return {f"prob_{c}": probs[:, i] for i, c in enumerate(class_names)}


class Softmax(Output):
    """One class out of K: argmax, ordinal cut points on the expected grade, or class quotas.

    Rules (``kind``): ``argmax``; ``ordinal`` (``cuts`` on the expected grade ``probs @ arange(K)``);
    ``distribution`` (class ``fractions`` matched over the batch, `metrics.match_distribution`).
    """

    activation = "softmax"

    def activate(self, logits, temperature=1.0):
        return M.softmax(logits, temperature)

    def activate_graph(self, logits):
        import tensorflow as tf

        return tf.nn.softmax(logits, axis=-1)

    def decide(self, probs, decision, class_names):
        p = np.asarray(probs, np.float64)
        kind = (decision or {}).get("kind", "argmax")
        if kind == "ordinal":
            return np.digitize(p @ np.arange(p.shape[1]), np.asarray(decision["cuts"], np.float64))
        if kind == "distribution" and len(p) >= 2 * len(class_names):
            return M.match_distribution(p, decision["fractions"])
        if kind == "distribution" and len(p):
            # Quotas over a handful of images force classes regardless of the evidence.
            log.warning("note: %d image(s) are too few to match the class distribution; using argmax", len(p))
        return p.argmax(axis=1)

    def rule(self, decision, class_names):
        # `distribution` matches class fractions over a whole batch, which a per-request graph
        # cannot do: it exports as argmax (export warns).
        if (decision or {}).get("kind") == "ordinal":
            return {"kind": "ordinal", "cuts": [float(c) for c in decision["cuts"]]}
        return {"kind": "argmax"}

    def labels_graph(self, probs, rule):
        import tensorflow as tf

        if rule["kind"] == "ordinal":
            grade = tf.reduce_sum(probs * tf.range(tf.shape(probs)[-1], dtype=tf.float32), axis=-1)
            return count_below(grade, rule["cuts"])
        return tf.argmax(probs, axis=-1)


class Sigmoid(Output):
    """K independent labels: per-class ``thresholds`` (default 0.5), multi-hot out."""

    activation = "sigmoid"

    def activate(self, logits, temperature=1.0):
        return M.sigmoid(np.asarray(logits, np.float64) / temperature)

    def activate_graph(self, logits):
        import tensorflow as tf

        return tf.sigmoid(logits)

    def decide(self, probs, decision, class_names):
        return np.asarray(probs, np.float64) >= np.asarray((decision or {}).get("thresholds", 0.5), np.float64)

    def rule(self, decision, class_names):
        th = np.broadcast_to(np.asarray((decision or {}).get("thresholds", 0.5), np.float64), (len(class_names),))
        return {"kind": "multilabel", "thresholds": [float(t) for t in th]}

    def labels_graph(self, probs, rule):
        import tensorflow as tf

        return tf.cast(probs >= tf.constant(rule["thresholds"], tf.float32), tf.int64)

    def describe(self):
        return {**super().describe(), "labels": "int64 multi-hot [N, K]: 1 where the label's probability "
                                                "reaches its threshold"}

    def label(self, decided, class_names):
        return ";".join(c for c, on in zip(class_names, decided, strict=True) if on)


def count_below(values, cuts):
    """How many of the increasing `cuts` each value reaches: ``np.digitize`` inside a graph, without
    searchsorted (which neither ONNX nor TFLite has)."""
    import tensorflow as tf

    return tf.reduce_sum(tf.cast(values[..., None] >= tf.constant(cuts, tf.float32), tf.int64), axis=-1)

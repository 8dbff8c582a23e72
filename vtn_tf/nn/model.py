"""The VTN cascade (paper Fig. 2): an optional affine stage, then dense stages.

Stage k sees ``concat([fixed, warped_{k-1}])`` and predicts its own flow ``f_k``;
the aggregate flow is ``agg_k = agg_{k-1} ⋆ f_k`` (`vtn_tf.nn.layers.ComposeFlows`), and
the *original* moving image is resampled once with ``agg_k`` (never re-warped,
`vtn_tf.nn.layers.SpatialTransformer`).
All flows are ``[B, X, Y, Z, 3]`` in voxels of the fixed grid, pulling.
"""


import keras
import tensorflow as tf

from vtn_tf.nn import losses
from vtn_tf.nn.layers import AffineFlow, ComposeFlows, SpatialTransformer
from vtn_tf.nn.networks import AffineSubnetwork, DenseSubnetwork, check_spatial_shape
from vtn_tf.nn.spec import MODEL_DEFAULTS as PAPER
from vtn_tf.nn.spec import (
    SIMILARITIES,
    default_similarity_weights,
    parse_spec,
    stage_names,
)


def _weights(name, value, spec, default):
    if value is None:
        return list(default)
    if isinstance(value, str):
        return default_similarity_weights(spec, value)
    value = [float(v) for v in value]
    if len(value) != len(spec):
        raise ValueError(f"{name} needs one weight per stage of {spec!r} ({len(spec)}); got {value}.")
    return value


@keras.saving.register_keras_serializable(package="vtn_tf")
class VTN(keras.Model):
    """Volume Tweening Network: a cascade of registration subnetworks.

    Args (defaults: ``vtn_tf.nn.spec.MODEL_DEFAULTS``, the paper's):
      spec: stages, e.g. "ADDD": at most one leading "A" (affine), then "D"s (dense).
      width: channel multiplier of every subnetwork (1.0 = the paper).
      flow_scale: dense output multiplier (the authors' 20).
      flow_head_initializer: "lecun_uniform" (paper) or "small" (near-identity start).
      similarity: "cc", the paper's global correlation coefficient (eq. 5-7), or
        "ncc", the squared local correlation in ``ncc_window``³ cubes
        (`vtn_tf.nn.losses.local_ncc_loss`; not in the paper).
      ncc_window: odd cube side in voxels, for "ncc".
      similarity_weights: one per stage, or "paper" (Table I, default) or "last".
      smoothness_weights: one per stage (ignored for the affine stage); default 1.
      determinant_weight, orthogonality_weight: affine-stage weights (Table I: 0.1).
      invertibility_weight: weight of eq. 12 (0 = off; the paper's liver uses 1e-3).
      central_fraction: region of the invertibility loss (0.5 = drop outer quarters).
      label_weight: weight of the soft Dice loss between the fixed labels and the moving
        labels warped by the final flow (`vtn_tf.nn.losses.label_dice_loss`; not in the paper).
        0 = off (unsupervised, the paper). When on, training batches carry one-hot
        ``fixed_labels`` / ``moving_labels`` ``[B, X, Y, Z, K]``; registering never needs labels.
      folding_weight: weight of the folding penalty on the final flow
        (`vtn_tf.nn.losses.folding_loss`, negative forward-difference Jacobian determinants;
        not in the paper). 0 = off.

    Call:
      ``model({"fixed": I1, "moving": I2})`` (or a tuple), images ``[B, X, Y, Z, 1]``
      float, spatial sizes divisible by 64. Returns a dict:
      ``flow`` (aggregate, ``[B, X, Y, Z, 3]`` voxels, pulling), ``warped``,
      ``stage_flows`` (each stage's own flow), ``stage_aggregate_flows``,
      ``stage_warped`` (moving resampled with each aggregate) and, with an affine
      stage, ``affine_matrix`` (``A = I + W``, ``[B, 3, 3]``) and
      ``affine_translation`` (``[B, 3]`` voxels, on centred coordinates).

    Losses: every term is the batch mean of a per-pair loss (the authors sum over
    the batch; with Adam the difference is a constant factor in the gradient, which
    Adam normalises away). Each weighted term is reported as a metric.
    """

    def __init__(self, spec=PAPER["spec"], width=PAPER["width"], flow_scale=PAPER["flow_scale"],
                 flow_head_initializer=PAPER["flow_head_initializer"],
                 similarity_weights=PAPER["similarity_weights"], smoothness_weights=PAPER["smoothness_weights"],
                 determinant_weight=PAPER["determinant_weight"], orthogonality_weight=PAPER["orthogonality_weight"],
                 invertibility_weight=PAPER["invertibility_weight"], central_fraction=PAPER["central_fraction"],
                 similarity=PAPER["similarity"], ncc_window=PAPER["ncc_window"],
                 label_weight=PAPER["label_weight"], folding_weight=PAPER["folding_weight"], **kwargs):
        super().__init__(**kwargs)
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {sorted(SIMILARITIES)}; got {similarity!r}.")
        losses.check_ncc_window(ncc_window)
        self.similarity, self.ncc_window = similarity, ncc_window
        self.spec = parse_spec(spec)
        self.width, self.flow_scale = float(width), float(flow_scale)
        self.flow_head_initializer = flow_head_initializer
        self.similarity_weights = _weights("similarity_weights", similarity_weights, spec,
                                           default_similarity_weights(spec))
        self.smoothness_weights = _weights("smoothness_weights", smoothness_weights, spec,
                                           [0.0 if s == "A" else 1.0 for s in spec])
        self.determinant_weight = float(determinant_weight)
        self.orthogonality_weight = float(orthogonality_weight)
        self.invertibility_weight = float(invertibility_weight)
        self.central_fraction = float(central_fraction)
        self.label_weight = float(label_weight)
        self.folding_weight = float(folding_weight)
        self.stage_names = stage_names(spec)
        self.stages = [
            AffineSubnetwork(width, name=name) if letter == "A" else
            DenseSubnetwork(width, flow_scale, flow_head_initializer, name=name)
            for letter, name in zip(spec, self.stage_names)]
        # Weightless spatial layers (float32 whatever the policy): checkpoints are unchanged.
        self.warp = SpatialTransformer(name="warp")
        self.compose = ComposeFlows(name="compose")
        self.affine_flow = AffineFlow(name="affine_flow") if spec.startswith("A") else None
        self.trackers = {name: keras.metrics.Mean(name=name)
                         for name in self.loss_term_names() + ["skipped_batches"]}
        self.skip_nonfinite_batches = False
        self._image_shape = None

    # ----- forward -------------------------------------------------------------------
    @staticmethod
    def _unpack_batch(data):
        """Keras hands batches over as ``x``, ``(x,)`` or ``(x, None, None)``; take ``x``."""
        if isinstance(data, (tuple, list)) and len(data) in (1, 3) and isinstance(data[0], (dict, tuple, list)) \
                and all(item is None for item in data[1:]):
            data = data[0]
        return VTN._unpack(data)

    @staticmethod
    def _unpack(inputs):
        if isinstance(inputs, dict):
            if "fixed" not in inputs or "moving" not in inputs:
                raise ValueError(f"VTN inputs need 'fixed' and 'moving'; got keys {sorted(inputs)}.")
            return inputs["fixed"], inputs["moving"]
        if isinstance(inputs, (tuple, list)) and len(inputs) == 2:
            return inputs
        raise ValueError("VTN inputs must be {'fixed': ..., 'moving': ...} or (fixed, moving).")

    @staticmethod
    def _check_images(fixed, moving):
        for name, image in (("fixed", fixed), ("moving", moving)):
            if image.shape.rank != 5 or image.shape[-1] != 1:
                raise ValueError(f"{name} image must be [B, X, Y, Z, 1]; got shape {image.shape}.")
            if not image.dtype.is_floating:
                raise ValueError(f"{name} image must be floating point; got {image.dtype.name}.")
        if fixed.shape[1:] != moving.shape[1:]:
            raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} images differ in grid; "
                             "resample them onto one grid first.")
        check_spatial_shape(fixed.shape)

    def call(self, inputs, training=False):
        fixed, moving = (tf.convert_to_tensor(image) for image in self._unpack(inputs))
        self._check_images(fixed, moving)
        fixed, moving = tf.cast(fixed, tf.float32), tf.cast(moving, tf.float32)
        out = {"stage_flows": [], "stage_aggregate_flows": [], "stage_warped": []}
        aggregate, warped, affine = None, moving, None
        for letter, stage in zip(self.spec, self.stages):
            pair = tf.concat([fixed, warped], axis=-1)
            if letter == "A":
                W, b = stage(pair, training=training)
                W, b = tf.cast(W, tf.float32), tf.cast(b, tf.float32)
                affine = (tf.eye(3) + W, b)
                flow = self.affine_flow([W, b, fixed])
                aggregate = flow
                out["affine_matrix"], out["affine_translation"] = affine
            else:
                flow = tf.cast(stage(pair, training=training), tf.float32)
                if aggregate is None:
                    aggregate = flow
                elif len(out["stage_flows"]) == 1 and affine is not None:
                    # Exact and cheaper than a resampling: agg = A·f + affine_flow.
                    aggregate = tf.einsum("bij,bxyzj->bxyzi", affine[0], flow) + aggregate
                else:
                    aggregate = self.compose([aggregate, flow])
            warped = self.warp([moving, aggregate])
            out["stage_flows"].append(flow)
            out["stage_aggregate_flows"].append(aggregate)
            out["stage_warped"].append(warped)
        out["flow"], out["warped"] = aggregate, warped
        return out

    def register(self, fixed, moving, passes=1):
        """Inference, optionally with test-time recursion of the whole cascade.

        Pass 1 is :meth:`call`. Each further pass registers the moving image warped by the
        flow so far and composes: ``flow_k = flow_{k-1} ⋆ cascade(fixed, warp(moving,
        flow_{k-1}))`` (eq. 3), the shared-weight recursion of the authors' later Recursive
        Cascaded Networks (Zhao et al., ICCV 2019), applied only at test time.

        Args:
          fixed, moving: ``[B, X, Y, Z, 1]`` images on the network grid.
          passes: how many times the cascade runs (1 = the paper).
        Returns:
          the :meth:`call` dict of pass 1, with ``flow`` (``[B, X, Y, Z, 3]``, voxels, pulling:
          ``warped(x) = moving(x + flow(x))``) and ``warped`` replaced by the composed ones.
          ``affine_matrix`` / ``affine_translation`` stay those of pass 1's affine stage.
        """
        passes = int(passes)
        if passes < 1:
            raise ValueError(f"passes must be at least 1, got {passes}")
        out = dict(self({"fixed": fixed, "moving": moving}))
        moving = tf.cast(moving, tf.float32)
        for _ in range(passes - 1):
            step = self({"fixed": fixed, "moving": out["warped"]})["flow"]
            out["flow"] = self.compose([out["flow"], step])
            out["warped"] = self.warp([moving, out["flow"]])
        return out

    def build(self, input_shape):
        """Create the weights for images of ``input_shape`` = ``[B, X, Y, Z, 1]``."""
        if isinstance(input_shape, dict):
            input_shape = input_shape["fixed"]
        elif isinstance(input_shape, (tuple, list)) and isinstance(input_shape[0], (tuple, list)):
            input_shape = input_shape[0]
        shape = [1 if n is None else int(n) for n in input_shape]
        zeros = tf.zeros(shape)
        self.call({"fixed": zeros, "moving": zeros})
        self._image_shape = [None] + shape[1:]
        self.built = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 first averages a distributed batch with strategy.reduce, which fails
        # for a dict batch under MultiWorkerMirroredStrategy. A built model with a built
        # optimizer (as `vtn_tf.training` makes) needs no symbolic build at all.
        if self.built and getattr(self, "optimizer", None) is not None and self.optimizer.built:
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def get_build_config(self):
        return {"image_shape": self._image_shape} if self._image_shape else {}

    def build_from_config(self, config):
        if config.get("image_shape"):
            self.build(config["image_shape"])

    # ----- losses --------------------------------------------------------------------
    def loss_term_names(self):
        names = ["loss"]
        for letter, stage in zip(self.spec, self.stage_names):
            names.append(f"{stage}_similarity")
            names += [f"{stage}_determinant", f"{stage}_orthogonality"] if letter == "A" else [
                f"{stage}_smoothness"]
        if self.invertibility_weight:
            names.append("invertibility")
        if self.label_weight:
            names.append("label_dice")
        if self.folding_weight:
            names.append("folding")
        return names

    def similarity_loss(self, fixed, warped):
        """``[B]`` dissimilarity of ``warped`` to ``fixed`` (0 = alike), as chosen by ``similarity``."""
        if self.similarity == "ncc":
            return losses.local_ncc_loss(fixed, warped, self.ncc_window)
        return losses.correlation_coefficient_loss(fixed, warped)

    def pass_loss_terms(self, fixed, outputs):
        """Unweighted batch-mean loss terms of one forward pass, and their weighted sum."""
        terms, total = {}, 0.0
        for k, (letter, stage) in enumerate(zip(self.spec, self.stage_names)):
            weighted = {f"{stage}_similarity": (self.similarity_weights[k], self.similarity_loss(
                fixed, outputs["stage_warped"][k]))}
            if letter == "A":
                A = outputs["affine_matrix"]
                weighted[f"{stage}_determinant"] = (self.determinant_weight, losses.determinant_loss(A))
                weighted[f"{stage}_orthogonality"] = (self.orthogonality_weight, losses.orthogonality_loss(A))
            else:
                weighted[f"{stage}_smoothness"] = (
                    self.smoothness_weights[k], losses.total_variation_loss(outputs["stage_flows"][k]))
            for name, (weight, value) in weighted.items():
                terms[name] = tf.reduce_mean(value)
                if weight:
                    total += weight * terms[name]
        return terms, total

    def label_loss(self, fixed_labels, moving_labels, flow):
        """``[]`` batch-mean soft Dice loss of ``moving_labels`` warped by ``flow`` (both
        one-hot ``[B, X, Y, Z, K]``; flow ``[B, X, Y, Z, 3]`` voxels, pulling)."""
        warped = self.warp([tf.cast(moving_labels, tf.float32), flow])
        return tf.reduce_mean(losses.label_dice_loss(fixed_labels, warped))

    def loss_terms(self, fixed, moving, training=False, labels=None):
        """All loss terms for a batch (with the swapped pass when invertibility is on).

        ``labels``: None, or ``(fixed_labels, moving_labels)`` one-hot ``[B, X, Y, Z, K]``
        for the ``label_dice`` term (used when ``label_weight`` is not 0)."""
        fixed = tf.cast(fixed, tf.float32)
        moving = tf.cast(moving, tf.float32)
        use_labels = bool(self.label_weight) and labels is not None
        forward = self({"fixed": fixed, "moving": moving}, training=training)
        terms, total = self.pass_loss_terms(fixed, forward)
        if use_labels:
            terms["label_dice"] = self.label_loss(labels[0], labels[1], forward["flow"])
        if self.folding_weight:
            terms["folding"] = tf.reduce_mean(losses.folding_loss(forward["flow"]))
        if self.invertibility_weight:
            backward = self({"fixed": moving, "moving": fixed}, training=training)
            back_terms, back_total = self.pass_loss_terms(moving, backward)
            if use_labels:
                back_terms["label_dice"] = self.label_loss(labels[1], labels[0], backward["flow"])
            if self.folding_weight:
                back_terms["folding"] = tf.reduce_mean(losses.folding_loss(backward["flow"]))
            terms = {name: (value + back_terms[name]) / 2.0 for name, value in terms.items()}
            total = (total + back_total) / 2.0
            terms["invertibility"] = tf.reduce_mean(losses.invertibility_loss(
                forward["flow"], backward["flow"], self.central_fraction))
            total += self.invertibility_weight * terms["invertibility"]
        if self.folding_weight:
            total += self.folding_weight * terms["folding"]
        if use_labels:
            total += self.label_weight * terms["label_dice"]
        elif self.label_weight:
            terms["label_dice"] = tf.constant(0.0)
        terms["loss"] = total
        return terms

    @property
    def metrics(self):
        return [tracker for name, tracker in self.trackers.items()
                if name != "skipped_batches" or self.skip_nonfinite_batches]

    def _record(self, terms):
        for name, value in terms.items():
            self.trackers[name].update_state(value)
        results = {tracker.name: tracker.result() for tracker in self.metrics}
        strategy = tf.distribute.get_strategy()
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
                strategy.extended._in_multi_worker_mode():
            # Keras 3.15 averages step logs across workers along axis 0, which scalars lack.
            results = {name: tf.reshape(value, [1]) for name, value in results.items()}
        return results

    @staticmethod
    def _batch_labels(data):
        """``(fixed_labels, moving_labels)`` of a training batch dict, or None."""
        if isinstance(data, (tuple, list)) and len(data) in (1, 3):
            data = data[0]
        if isinstance(data, dict) and "fixed_labels" in data and "moving_labels" in data:
            return data["fixed_labels"], data["moving_labels"]
        return None

    def train_step(self, data):
        fixed, moving = self._unpack_batch(data)
        with tf.GradientTape() as tape:
            terms = self.loss_terms(fixed, moving, training=True, labels=self._batch_labels(data))
            scaled = self.optimizer.scale_loss(terms["loss"])
        gradients = tape.gradient(scaled, self.trainable_variables)
        if self.skip_nonfinite_batches:
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients if g is not None]
                                   + [tf.math.is_finite(terms["loss"])])

            def skip():
                self.optimizer.iterations.assign_add(1)  # the step still counts: data and schedule stay aligned
                return tf.constant(True)

            skipped = tf.cond(finite, lambda: self._apply(gradients), skip)
            terms = {name: tf.where(finite, value, 0.0) for name, value in terms.items()}
            terms["skipped_batches"] = tf.cast(skipped, tf.float32)
        else:
            self._apply(gradients)
        return self._record(terms)

    def skip_nonfinite(self, enabled=True):
        """Skip (instead of applying) any batch whose loss or gradients are NaN/Inf.

        Skipped batches still advance the step counter; the share of skipped
        batches is reported as the ``skipped_batches`` metric."""
        self.skip_nonfinite_batches = bool(enabled)

    def _apply(self, gradients):
        self.optimizer.apply(gradients, self.trainable_variables)
        return tf.constant(False)

    def test_step(self, data):
        fixed, moving = self._unpack_batch(data)
        return self._record(self.loss_terms(fixed, moving, training=False, labels=self._batch_labels(data)))

    def get_config(self):
        return {**super().get_config(), "spec": self.spec, "width": self.width,
                "flow_scale": self.flow_scale, "flow_head_initializer": self.flow_head_initializer,
                "similarity_weights": self.similarity_weights, "smoothness_weights": self.smoothness_weights,
                "determinant_weight": self.determinant_weight,
                "orthogonality_weight": self.orthogonality_weight,
                "invertibility_weight": self.invertibility_weight, "central_fraction": self.central_fraction,
                "similarity": self.similarity, "ncc_window": self.ncc_window, "label_weight": self.label_weight,
                "folding_weight": self.folding_weight}

"""Instance optimisation (``--refine``): what one Adam step costs, part by part, per level.

Grids: the refinement levels of an LPBA40 pair at native resolution (the fixed image's
foreground box, 135x171x130 of 160x192x160, at full and half resolution), a random field and
random images (speed only). Parts, each its value and gradient with respect to the field in
one XLA program, as inside `vtn_tf.registration.refinement`:

* sampling: trilinear sampling of the moving image at the field's positions, by
  `vtn_tf.core.sampling.sample` (8 gathers, the gradient gathering again) and by the corner table
  that refinement uses (`vtn_tf.core.sampling.sample_mapped`: one 8-value row a position, the
  gradient formed in the forward pass);
* local correlation: 5^3 windows against precomputed fixed-image statistics;
* smoothness: the total variation of the field (`vtn_tf.registration.refinement.smoothness`, its gradient
  written out), and the same by automatic differentiation (`vtn_tf.nn.losses.total_variation_loss`);
* smoothness and folding: that term with the penalty on negative Jacobian determinants
  (`vtn_tf.registration.refinement.regularisers`, one written-out gradient), and the same by automatic
  differentiation;
* loss: the whole refinement loss (the three together);
* Adam step: one step of the compiled 10-step loop (loss, gradient and update), as
  refinement runs it (the corner table, XLA), with the image sampler instead, and without XLA.

Milliseconds, median of ``--repeats`` after a warm-up; the ratio columns compare in the same run.
"""

import numpy as np
from common import (
    base_parser,
    print_machine,
    print_table,
    ratio,
    setup_tensorflow,
    time_call,
)

MOVING = (160, 192, 160)
LEVELS = {"full (1 mm)": (135, 171, 130), "1/2 (2 mm)": (68, 86, 65)}
QUICK_LEVELS = {"48^3": (48, 48, 48)}


def measure(tf, shape, moving_shape, repeats, warmup):
    from vtn_tf.core import fields, grids, sampling
    from vtn_tf.nn import losses
    from vtn_tf.registration import refinement

    rng = np.random.default_rng(0)
    fixed = tf.constant(rng.random((1,) + shape + (1,), np.float32))
    moving = tf.constant(rng.random((1,) + moving_shape + (1,), np.float32))
    grid = grids.identity_grid(shape)
    field = tf.constant(rng.normal(0.0, 1.0, shape + (3,)).astype(np.float32))
    statistics = losses.local_ncc_fixed_statistics(fixed, 5)
    matrix = tf.constant(np.eye(4)[:3], tf.float32)
    weights, factor = tf.constant([1.0]), tf.constant(1.0)
    zeros = tf.zeros_like(field)  # no initial alignment; also Adam's starting moments

    def with_gradient(loss):
        @tf.function(jit_compile=True)
        def step(u):
            with tf.GradientTape() as tape:
                tape.watch(u)
                value = loss(u)
            return value, tape.gradient(value, u)
        return lambda: step(field)[1].numpy()

    table = sampling.corner_table(moving[0, ..., 0])
    parts = {
        "sampling": lambda u: tf.reduce_sum(sampling.sample(moving, (grid + u)[None], "linear", "zero")),
        "sampling, corner table": lambda u: tf.reduce_sum(sampling.sample_mapped(table, grid + u, matrix)),
        "local correlation": lambda u: losses.local_ncc_loss_to_fixed(statistics, fixed + u[None, ..., :1], 5)[0],
        "smoothness": refinement.smoothness,
        "smoothness, automatic gradient": lambda u: losses.total_variation_loss(u[None])[0],
        "smoothness and folding": lambda u: refinement.regularisers(u, 0.0, 1.0, 1.0, 1.0),
        "smoothness and folding, automatic gradient": lambda u: losses.total_variation_loss(u[None])[0]
        + tf.reduce_mean(tf.nn.relu(-fields.forward_jacobian_determinant(u))),
        "loss": lambda u: refinement.refinement_loss(u, statistics, table, grid, zeros, matrix, factor, weights,
                                                     "ncc", 5),
    }
    seconds = {name: time_call(with_gradient(loss), repeats, warmup)[0] for name, loss in parts.items()}
    arguments = (tf.constant(0.3), statistics, table, grid, zeros, matrix, factor, weights, "ncc", 5)
    with_image = (tf.constant(0.3), statistics, moving) + arguments[3:]
    plain = tf.function(refinement.adam_steps_eager, jit_compile=False)
    for name, steps, given in (("Adam step", refinement.adam_steps, arguments),
                               ("Adam step, image sampler", refinement.adam_steps, with_image),
                               ("Adam step, no XLA", plain, arguments)):
        run = lambda steps=steps, given=given: steps(field, zeros, zeros, tf.constant(0.0), tf.constant(10),
                                                     *given)[0].numpy()
        seconds[name] = time_call(run, max(1, repeats // 2), warmup)[0] / 10
    return seconds


def main():
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    tf = setup_tensorflow(args)
    repeats, warmup = args.repeats or (2 if args.quick else 5), 1 if args.warmup is None else args.warmup
    print_machine(args)
    levels = QUICK_LEVELS if args.quick else LEVELS
    moving = (56, 56, 56) if args.quick else MOVING
    names = ["sampling", "sampling, corner table", "local correlation", "smoothness", "smoothness, automatic gradient",
             "smoothness and folding", "smoothness and folding, automatic gradient", "loss", "Adam step",
             "Adam step, image sampler", "Adam step, no XLA"]
    rows = []
    for level, shape in levels.items():
        seconds = measure(tf, shape, moving, repeats, warmup)
        rows.append([level, "x".join(map(str, shape))] + [f"{1000 * seconds[n]:.0f} ms" for n in names]
                    + [ratio(seconds["sampling, corner table"], seconds["loss"]),
                       ratio(seconds["Adam step, image sampler"], seconds["Adam step"]),
                       ratio(seconds["Adam step, no XLA"], seconds["Adam step"]),
                       ratio(seconds["smoothness, automatic gradient"], seconds["smoothness"]),
                       ratio(seconds["smoothness and folding, automatic gradient"], seconds["smoothness and folding"])])
    print_table(["level", "grid"] + names + ["sampling / loss", "image sampler / corner table", "no XLA / XLA",
                                             "automatic / written gradient", "the same with folding"], rows)


if __name__ == "__main__":
    main()

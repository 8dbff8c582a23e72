"""Speed of `vtn_tf.warp` (trilinear and nearest) against scipy and a plain TF gather.

Cells: volume size × interpolation × {forward, forward+backward}. Batch 1, one channel,
a smooth random flow of a few voxels (coarse Gaussian noise, trilinearly upsampled,
at most ``--displacement`` voxels). Columns compare, in one run:

* ``vtn``: `vtn_tf.warp` (XLA-compiled gathers, `vtn_tf.core.sampling.sample_linear`);
* ``scipy``: ``scipy.ndimage.map_coordinates(order=1, mode="nearest")`` (forward only;
  ``order=0`` for nearest), including the ``grid + flow`` addition;
* ``gather``: the same trilinear maths as vtn in a plain ``tf.function`` without XLA;
* candidate replacements for ``_sample_linear`` (``--candidate-sizes``, default 128^3 only),
  checked against scipy (max |difference| must stay below 1e-5) and against vtn's gradients.
  The first, "autodiff gradients", is vtn's forward with TensorFlow's own gradients instead of
  its hand-written ones; "8 gathers" computes the 8 corners as independently clamped gathers
  with static shapes.

Forward+backward: gradient of ``sum(out * r)`` (r fixed random) w.r.t. image and flow via
``tf.GradientTape`` inside a ``tf.function``; "flow only" differentiates with respect to the
flow alone, as training does when it warps the (constant) moving image.

Usage: ``python benchmarks/bench_warp.py [--quick] [--sizes 64 128 160x192x160]``.
"""

import common
import numpy as np

DEFAULT_SIZES = ("64", "128", "160x192x160")
TOLERANCE = 1e-5


def parse_size(text):
    parts = [int(p) for p in text.lower().split("x")]
    return tuple(parts * 3) if len(parts) == 1 else tuple(parts)


def smooth_flow(shape, displacement, rng):
    """``[X, Y, Z, 3]`` float32: coarse noise upsampled, scaled to max |component| = displacement."""
    from scipy import ndimage

    coarse = rng.standard_normal((5, 5, 5, 3)).astype(np.float32)
    zoom = [n / 5 for n in shape] + [1]
    flow = ndimage.zoom(coarse, zoom, order=1)[: shape[0], : shape[1], : shape[2]]
    return (flow * (displacement / np.abs(flow).max())).astype(np.float32)


# ---- implementations compared ------------------------------------------------------------
def build_implementations(tf):
    """``{name: (linear_fn, xla)}``: each maps image [B,X,Y,Z,C], flow [B,X,Y,Z,3] to [B,X,Y,Z,C]."""

    def grid_position(image, flow):
        size = image.shape[1:4]
        axes = [tf.range(n, dtype=flow.dtype) for n in size]
        grid = tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)
        max_index = tf.constant([n - 1 for n in size], flow.dtype)
        return tf.clip_by_value(grid + flow, 0.0, max_index)

    def eight_gathers(image, flow):
        """vtn's maths (8 gathers with batch_dims=1, int32 index chain), static shapes."""
        b, x, y, z, c = image.shape
        position = grid_position(image, flow)
        lower_f = tf.floor(position)
        frac = position - lower_f
        lower = tf.cast(lower_f, tf.int32)
        upper = tf.minimum(lower + 1, tf.constant([x - 1, y - 1, z - 1]))
        flat = tf.reshape(image, [b, -1, c])
        out = 0.0
        for cx in (0, 1):
            ix, wx = (upper[..., 0], frac[..., 0]) if cx else (lower[..., 0], 1.0 - frac[..., 0])
            for cy in (0, 1):
                iy, wy = (upper[..., 1], frac[..., 1]) if cy else (lower[..., 1], 1.0 - frac[..., 1])
                for cz in (0, 1):
                    iz, wz = (upper[..., 2], frac[..., 2]) if cz else (lower[..., 2], 1.0 - frac[..., 2])
                    index = ix * (y * z) + iy * z + iz
                    values = tf.gather(flat, tf.reshape(index, [b, -1]), batch_dims=1)
                    out += tf.reshape(values, image.shape) * (wx * wy * wz)[..., None]
        return out

    def one_gather_stacked(image, flow):
        """The 8 corner indices stacked, one flat gather (batch offset instead of batch_dims)."""
        b, x, y, z, c = image.shape
        n = x * y * z
        position = grid_position(image, flow)
        lower_f = tf.floor(position)
        frac = position - lower_f
        lower = tf.cast(lower_f, tf.int32)
        upper = tf.minimum(lower + 1, tf.constant([x - 1, y - 1, z - 1]))
        indices, weights = [], []
        for cx in (0, 1):
            for cy in (0, 1):
                for cz in (0, 1):
                    corner = [upper[..., a] if k else lower[..., a] for a, k in enumerate((cx, cy, cz))]
                    indices.append(corner[0] * (y * z) + corner[1] * z + corner[2])
                    w = [frac[..., a] if k else 1.0 - frac[..., a] for a, k in enumerate((cx, cy, cz))]
                    weights.append(w[0] * w[1] * w[2])
        offset = tf.reshape(tf.range(b) * n, [b, 1, 1, 1, 1])
        index = tf.stack(indices, axis=-1) + offset  # [B, X, Y, Z, 8]
        values = tf.gather(tf.reshape(image, [b * n, c]), index)  # [B, X, Y, Z, 8, C]
        return tf.reduce_sum(values * tf.stack(weights, axis=-1)[..., None], axis=-2)

    def shifted(t, axis):
        """``t`` moved by one voxel towards lower indices along ``axis``, last slice repeated."""
        n = t.shape[axis]
        head = tf.gather(t, tf.range(1, n), axis=axis)
        tail = tf.gather(t, [n - 1], axis=axis)
        return tf.concat([head, tail], axis=axis)

    def corner_rows(image, flow):
        """One gather of 8-wide rows: precompute each voxel's 2×2×2 neighbourhood (edge-clamped)
        as channels, gather it once at the lower corner, then 7 lerps (z, then y, then x)."""
        b, x, y, z, c = image.shape
        n = x * y * z
        rows = tf.concat([image, shifted(image, 3)], axis=-1)   # [.., (cz, C)]
        rows = tf.concat([rows, shifted(rows, 2)], axis=-1)     # [.., (cy, cz, C)]
        rows = tf.concat([rows, shifted(rows, 1)], axis=-1)     # [.., (cx, cy, cz, C)]
        position = grid_position(image, flow)
        lower_f = tf.floor(position)
        frac = position - lower_f
        strides = tf.constant([y * z, z, 1], flow.dtype)
        # Exact in float32 while X·Y·Z·B < 2^24 (16.7 M voxels): one multiply-add, one cast.
        index = tf.cast(tf.reduce_sum(lower_f * strides, axis=-1), tf.int32)
        index += tf.reshape(tf.range(b) * n, [b, 1, 1, 1])
        v = tf.gather(tf.reshape(rows, [b * n, 8 * c]), index)
        v = tf.reshape(v, [b, x, y, z, 2, 2, 2, c])
        fz = frac[..., 2, None, None, None]  # broadcasts over (cx, cy, C)
        fy = frac[..., 1, None, None]        # over (cx, C)
        fx = frac[..., 0, None]              # over (C)
        v = v[..., 0, :] + (v[..., 1, :] - v[..., 0, :]) * fz           # [.., 2, 2, C]
        v = v[..., 0, :] + (v[..., 1, :] - v[..., 0, :]) * fy           # [.., 2, C]
        return v[..., 0, :] + (v[..., 1, :] - v[..., 0, :]) * fx        # [.., C]

    from vtn_tf.core import sampling

    return {
        "gather (no XLA)": (eight_gathers, False),
        "vtn's forward, autodiff gradients": (sampling.sample_linear_forward.python_function, True),
        "8 gathers, static shapes (XLA)": (eight_gathers, True),
        "1 gather, stacked indices (XLA)": (one_gather_stacked, True),
        "corner rows: 1 gather of 8-wide rows (XLA)": (corner_rows, True),
    }


def nearest_flat(tf):
    def sample(image, flow):
        b, x, y, z, c = image.shape
        axes = [tf.range(n, dtype=flow.dtype) for n in (x, y, z)]
        grid = tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)
        position = tf.clip_by_value(tf.round(grid + flow), 0.0, tf.constant([x - 1, y - 1, z - 1], flow.dtype))
        index = tf.cast(tf.reduce_sum(position * tf.constant([y * z, z, 1], flow.dtype), -1), tf.int32)
        index += tf.reshape(tf.range(b) * (x * y * z), [b, 1, 1, 1])
        return tf.gather(tf.reshape(image, [-1, c]), index)
    return sample


# ---- measurement -------------------------------------------------------------------------
def scipy_warp(image, flow, grid, order):
    from scipy import ndimage
    coordinates = np.moveaxis(grid + flow, -1, 0)
    return ndimage.map_coordinates(image, coordinates, order=order, mode="nearest")


def main():
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=None, help="e.g. 64 128 160x192x160")
    parser.add_argument("--displacement", type=float, default=4.0, help="max flow component, voxels")
    parser.add_argument("--candidate-sizes", nargs="*", default=None,
                        help="sizes at which to time the candidate rewrites (default 128; --full: all)")
    args = parser.parse_args()
    sizes = args.sizes or (("32",) if args.quick else DEFAULT_SIZES)
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    tf = common.setup_tensorflow(args)
    import vtn_tf

    print("# Warp: vtn_tf.warp against scipy and plain TF gathers\n")
    common.print_machine(args, [f"batch 1, 1 channel, smooth random flow (max {args.displacement} voxels); "
                                f"median of {repeats} after {warmup} warm-up"])
    implementations = build_implementations(tf)
    if args.candidate_sizes is None:
        args.candidate_sizes = list(sizes) if (args.full or args.quick) else ["128"]
    rng = np.random.default_rng(0)
    rows, candidate_rows = [], []
    for size_text in sizes:
        shape = parse_size(size_text)
        label = "×".join(map(str, shape))
        image_np = rng.random(shape, dtype=np.float32)
        flow_np = smooth_flow(shape, args.displacement, rng)
        grid_np = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
        image = tf.constant(image_np[None, ..., None])
        flow = tf.constant(flow_np[None])
        weights = tf.constant(rng.random(shape, dtype=np.float32)[None, ..., None])

        for interpolation, order in (("linear", 1), ("nearest", 0)):
            reference = scipy_warp(image_np, flow_np, grid_np, order)
            scipy_s, _ = common.time_call(lambda: scipy_warp(image_np, flow_np, grid_np, order), repeats, warmup)

            def forward(i, f, _interpolation=interpolation):
                return vtn_tf.warp(i, f, _interpolation)

            def gather_forward(i, f):
                if interpolation == "linear":
                    return naive_linear(i, f)
                return naive_nearest(i, f)

            naive_linear = tf.function(build_implementations(tf)["gather (no XLA)"][0])
            naive_nearest = tf.function(nearest_flat(tf))
            vtn_out = forward(image, flow)
            diff = float(np.abs(vtn_out.numpy()[0, ..., 0] - reference).max())
            common.reset_peak_memory()
            vtn_s, _ = common.time_call(lambda: forward(image, flow), repeats, warmup)
            vtn_mem = common.peak_memory_text()
            gather_fn = tf.function(gather_forward)
            gather_s, _ = common.time_call(lambda: gather_fn(image, flow), repeats, warmup)
            rows.append([label, interpolation, "forward", common.format_seconds(vtn_s),
                         common.format_seconds(scipy_s), common.format_seconds(gather_s),
                         common.ratio(scipy_s, vtn_s), common.ratio(gather_s, vtn_s),
                         f"{diff:.1e}", vtn_mem])
            if interpolation == "linear":
                candidates = implementations if size_text in args.candidate_sizes else {}
                backward = gradient_function(tf, lambda i, f: vtn_tf.warp(i, f), weights)
                naive_backward = gradient_function(tf, naive_linear, weights)
                common.reset_peak_memory()
                vtn_b, _ = common.time_call(lambda: backward(image, flow), repeats, warmup)
                vtn_b_mem = common.peak_memory_text()
                gather_b, _ = common.time_call(lambda: naive_backward(image, flow), repeats, warmup)
                rows.append([label, interpolation, "forward+backward", common.format_seconds(vtn_b),
                             "—", common.format_seconds(gather_b), "—", common.ratio(gather_b, vtn_b),
                             "", vtn_b_mem])
                flow_only = gradient_function(tf, lambda i, f: vtn_tf.warp(i, f), weights, flow_only=True)
                naive_flow_only = gradient_function(tf, naive_linear, weights, flow_only=True)
                vtn_f, _ = common.time_call(lambda: flow_only(image, flow), repeats, warmup)
                gather_f, _ = common.time_call(lambda: naive_flow_only(image, flow), repeats, warmup)
                rows.append([label, interpolation, "forward+backward, flow only", common.format_seconds(vtn_f),
                             "—", common.format_seconds(gather_f), "—", common.ratio(gather_f, vtn_f), "", ""])
                candidate_rows += measure_candidates(
                    tf, candidates, image, flow, weights, reference, backward(image, flow),
                    label, vtn_s, vtn_b, scipy_s, repeats, warmup)
            print(f"  … {label} {interpolation} done", flush=True)

    print()
    common.print_table(["size", "interp.", "pass", "vtn", "scipy", "gather (no XLA)",
                        "scipy / vtn", "gather / vtn", "max |vtn − scipy|", common.memory_label() + " (vtn)"],
                       rows)
    if candidate_rows:
        print("## Candidate `_sample_linear` rewrites (trilinear)\n")
        print("Ratios > 1× mean faster than `vtn_tf.warp`. `ok` = max |candidate − scipy| < "
              f"{TOLERANCE:g} and gradients equal to vtn's within 1e-4 (relative; flow gradients away "
              "from the volume's edges, where the one-sided derivative is a convention).\n")
        common.print_table(["size", "candidate", "forward", "vtn fwd / cand.", "scipy / cand.",
                            "fwd+bwd", "vtn fwd+bwd / cand.", "max |cand − scipy|", "grad diff", "ok"],
                           candidate_rows)
    common.finish()


def gradient_function(tf, sample, weights, flow_only=False):
    @tf.function
    def run(image, flow):
        with tf.GradientTape() as tape:
            tape.watch(flow if flow_only else [image, flow])
            loss = tf.reduce_sum(sample(image, flow) * weights)
        return tape.gradient(loss, flow if flow_only else [image, flow])
    return run


def relative_difference(a, b, keep=None):
    """max |a - b| / max |b|, over the voxels where ``keep`` ([B, X, Y, Z]) is true."""
    if keep is not None:
        a, b = a[keep], b[keep]
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def interior_positions(flow):
    """[B, X, Y, Z] bool: grid + flow is at least 1e-3 voxel from every edge of the volume.

    On an edge the derivative of a clamped trilinear sample is one-sided, and implementations
    may pick either side (vtn uses the inward difference); flow gradients are compared
    only away from the edges.
    """
    shape = flow.shape[1:4]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    position = grid + flow
    top = np.array(shape, np.float32) - 1
    return np.all((np.abs(position) > 1e-3) & (np.abs(position - top) > 1e-3), axis=-1)


def measure_candidates(tf, implementations, image, flow, weights, reference, vtn_grads, label,
                       vtn_s, vtn_b, scipy_s, repeats, warmup):
    rows = []
    interior = interior_positions(flow.numpy())
    for name, (sample, xla) in implementations.items():
        if name == "gather (no XLA)":
            continue
        fn = tf.function(sample, jit_compile=xla)
        out = fn(image, flow).numpy()[0, ..., 0]
        diff = float(np.abs(out - reference).max())
        fwd, _ = common.time_call(lambda: fn(image, flow), repeats, warmup)
        backward = gradient_function(tf, fn, weights)
        grads = backward(image, flow)
        grad_diff = max(relative_difference(g.numpy(), v.numpy(), keep)
                        for g, v, keep in zip(grads, vtn_grads, (None, interior)))
        bwd, _ = common.time_call(lambda: backward(image, flow), repeats, warmup)
        ok = "yes" if diff < TOLERANCE and grad_diff < 1e-4 else "NO"
        rows.append([label, name, common.format_seconds(fwd), common.ratio(vtn_s, fwd),
                     common.ratio(scipy_s, fwd), common.format_seconds(bwd), common.ratio(vtn_b, bwd),
                     f"{diff:.1e}", f"{grad_diff:.1e}", ok])
    return rows


if __name__ == "__main__":
    main()

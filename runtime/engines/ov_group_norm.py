"""GroupNorm in a form OpenVINO's CPU plugin runs without changing the tensor's memory layout.

PyTorch's exporter writes `GroupNorm(G)` on x [N, C, H, W] as Reshape(x, [N, G, -1]) ->
InstanceNormalization (OpenVINO: MVN over the last axis) -> Mul/Add by the per-group ones/zeros ->
Reshape back -> Mul(gamma [C, 1, 1]) -> Add(beta). The CPU plugin runs convolutions channels-last
(or channel-blocked) and a Reshape that regroups channels only in the plain layout, so every GroupNorm
costs two full-tensor reorders around it: 16% of the SD 1.5 VAE decoder's time at 256 px with bf16,
20% at 512 px (OpenVINO 2026.4, per-node profile: `python -m benchmarks.vae_decode`). OpenVINO's own
GroupNormalization op is decomposed back into that pattern by the plugin (measured: same time).

`layout_free_group_norms(model)` rewrites each such pattern, in place, into per-channel reductions
over (H, W), which run in any layout, with the group statistics formed on the small [N, C, 1, 1]
tensors:

    m_c   = mean over the group of c of ReduceMean(x, (H, W))         (equal group sizes: exact)
    d     = x - m_c
    v_c   = mean over the group of c of ReduceMean(d * d, (H, W))     (two-pass: no cancellation)
    y     = d * (gamma_c * (v_c + eps) ** -0.5) + beta_c

which is the MVN's own arithmetic (eps inside the square root, biased variance) in another order,
so float32 results agree to rounding (the tests hold the rewritten tiny decoder to 1e-5 of the
original; SD 1.5's decoder differs by at most 9.4e-6, `python -m benchmarks.vae_decode`). The
per-group scale/shift the exporter inserts (ones and zeros from PyTorch) are folded into gamma/beta.
Patterns that differ in any way are left as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The chain that follows the MVN, in order: per-group scale and shift, reshape back to [N, C, H, W],
# per-channel gamma and beta.
_CHAIN = ("Multiply", "Add", "Reshape", "Multiply", "Add")


def _only_consumer(node: Any, type_name: str) -> Any | None:
    targets = list(node.output(0).get_target_inputs())
    if len(targets) != 1 or targets[0].get_node().get_type_name() != type_name:
        return None
    return targets[0].get_node()


def _constant_operand(node: Any, other: Any) -> np.ndarray | None:
    """The value of `node`'s Constant input that is not `other`, or None."""
    for i in range(node.get_input_size()):
        source = node.input(i).get_source_output().get_node()
        if source is not other and source.get_type_name() == "Constant":
            return source.get_data()
    return None


def _match(mvn: Any) -> tuple[Any, int, np.ndarray, np.ndarray, float, Any] | None:
    """(x, groups, gamma [C], beta [C], eps, the last node of the pattern) or None."""
    attrs = mvn.get_attributes()
    if not attrs.get("normalize_variance") or attrs.get("eps_mode", "").upper() != "INSIDE_SQRT":
        return None
    if mvn.get_input_size() != 2 or mvn.input(1).get_source_output().get_node().get_type_name() != "Constant":
        return None
    axes = mvn.input(1).get_source_output().get_node().get_data().reshape(-1).tolist()
    if axes not in ([2], [-1]):
        return None
    grouped = mvn.input(0).get_source_output().get_node()
    if grouped.get_type_name() != "Reshape":
        return None
    x = grouped.input(0).get_source_output()
    if x.get_element_type().get_type_name() != "f32":
        return None
    shape, group_shape = x.get_partial_shape(), grouped.get_output_partial_shape(0)
    if shape.rank.is_dynamic or shape.rank.get_length() != 4 or not shape[1].is_static:
        return None
    if group_shape.rank.is_dynamic or group_shape.rank.get_length() != 3 or not group_shape[1].is_static:
        return None
    channels, groups = shape[1].get_length(), group_shape[1].get_length()
    if groups < 1 or channels % groups:
        return None
    chain, node = [], mvn
    for type_name in _CHAIN:
        node = _only_consumer(node, type_name)
        if node is None:
            return None
        chain.append(node)
    if chain[2].get_output_partial_shape(0).rank.get_length() != 4:
        return None
    scale, shift = _constant_operand(chain[0], mvn), _constant_operand(chain[1], chain[0])
    gamma, beta = _constant_operand(chain[3], chain[2]), _constant_operand(chain[4], chain[3])
    if any(v is None for v in (scale, shift, gamma, beta)):
        return None
    if scale.size not in (1, groups) or shift.size not in (1, groups) or gamma.size not in (1, channels) \
            or beta.size not in (1, channels):
        return None
    per = channels // groups
    scale = np.repeat(np.broadcast_to(scale.reshape(-1), (groups,)), per).astype(np.float64)
    shift = np.repeat(np.broadcast_to(shift.reshape(-1), (groups,)), per).astype(np.float64)
    gamma = np.broadcast_to(gamma.reshape(-1), (channels,)).astype(np.float64)
    beta = np.broadcast_to(beta.reshape(-1), (channels,)).astype(np.float64)
    # gamma * (scale * n + shift) + beta with n the normalized value
    return x, groups, (gamma * scale).astype(np.float32), (gamma * shift + beta).astype(np.float32), \
        float(attrs["eps"]), chain[-1]


def _group_mean(per_channel: Any, groups: int, channels: int) -> Any:
    """[N, C, 1, 1] -> each channel's group mean, [N, C, 1, 1]."""
    import openvino.opset13 as ops

    grouped = ops.reshape(per_channel, ops.constant(np.array([0, groups, channels // groups], np.int64)), True)
    mean = ops.reduce_mean(grouped, ops.constant(np.array([2], np.int64)), True)  # [N, G, 1]
    target = ops.concat([ops.gather(ops.shape_of(per_channel), ops.constant(np.array([0], np.int64)),
                                    ops.constant(np.int64(0))),
                         ops.constant(np.array([groups, channels // groups], np.int64))], 0)
    return ops.reshape(ops.broadcast(mean, target), ops.constant(np.array([0, channels, 1, 1], np.int64)), True)


def layout_free_group_norms(model: Any) -> int:
    """Rewrite every exported GroupNorm of `model` (an ov.Model, changed in place) as described in
    the module docstring; returns how many were rewritten."""
    import openvino.opset13 as ops
    from openvino import passes

    if not any(op.get_type_name() == "MVN" for op in model.get_ordered_ops()):
        return 0
    # The ONNX frontend broadcasts InstanceNormalization's scale through ShapeOf of the MVN's output;
    # on a static shape those fold to constants, and the pattern is then a chain.
    folding = passes.Manager()
    folding.register_pass(passes.ConstantFolding())
    folding.run_passes(model)
    matches = [m for m in (_match(op) for op in model.get_ordered_ops() if op.get_type_name() == "MVN") if m]
    hw = ops.constant(np.array([2, 3], np.int64))
    for x, groups, gamma, beta, eps, last in matches:
        channels = gamma.size
        mean = _group_mean(ops.reduce_mean(x, hw, True), groups, channels)
        centred = ops.subtract(x, mean)
        var = _group_mean(ops.reduce_mean(ops.multiply(centred, centred), hw, True), groups, channels)
        inv_std = ops.power(ops.add(var, ops.constant(np.float32(eps))), ops.constant(np.float32(-0.5)))
        scale = ops.multiply(ops.constant(gamma.reshape(1, channels, 1, 1)), inv_std)
        y = ops.add(ops.multiply(centred, scale), ops.constant(beta.reshape(1, channels, 1, 1)))
        for target in list(last.output(0).get_target_inputs()):
            target.replace_source_output(y.output(0))
    if matches:
        model.validate_nodes_and_infer_types()
    return len(matches)

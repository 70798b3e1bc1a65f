"""Device mesh and the logical-axis rules that place parameters and activations on it.

Parameters carry logical axis names (`embed`, `heads`, `mlp`, ...), set where they are
created. One rules table (`config.sharding_rules`) maps each logical name to mesh axes;
nothing else in the code names a mesh axis. The train step is `jax.jit` with the
`NamedSharding`s built here as explicit in/out shardings (what used to be pjit).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A 4-axis mesh; one axis may be -1 and takes the devices the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def data_mesh(devices=None) -> Mesh:
    """Every device on the data axis: inference (parameters replicated, batch split)."""
    return make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1}, devices)


def logical_to_mesh(names, rules) -> P:
    """PartitionSpec of mesh axes for a tuple of logical names (None: replicated)."""
    table = dict(rules)
    out, used = [], set()
    for name in names:
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis '{name}' has no sharding rule")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis shards one dim only
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def _fit(spec: P, shape, mesh: Mesh) -> P:
    """Drops mesh axes from dims they do not divide (small tensors stay replicated)."""
    dims = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        dims.append(axes if names and dim % size == 0 else None)
    return P(*dims)


def param_shardings(abstract_model: nnx.Module, abstract_params, mesh: Mesh, rules):
    """NamedSharding per parameter, from the logical names the model annotated."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract_model, nnx.Param)))
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit(logical_to_mesh(spec, rules), x.shape, mesh)),
        specs,
        abstract_params,
        is_leaf=lambda s: isinstance(s, P),
    )


def state_shardings(abstract_model, abstract_state, tx: optax.GradientTransformation, mesh, rules):
    """Shardings of the whole train state: optimizer moments and EMA follow their parameter."""
    params = param_shardings(abstract_model, abstract_state["params"], mesh, rules)
    replicated = NamedSharding(mesh, P())
    masked = lambda v: isinstance(v, optax.MaskedNode)  # a frozen parameter: no moments
    opt = optax.tree_map_params(
        tx,
        lambda v, s: v if masked(v) else s,
        abstract_state["opt_state"],
        params,
        transform_non_params=lambda _: replicated,
        is_leaf=masked,
    )
    return dict(step=replicated, rng=replicated, params=params, ema=params, opt_state=opt)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Leading (example) dimension split over the data-like axes."""
    return NamedSharding(mesh, logical_to_mesh(("batch",), rules))


def constrain(x, names, rules):
    """Sharding constraint on an activation by logical names (no-op outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(names, rules))


def replicated_fraction(abstract_params, shardings) -> float:
    """Fraction of parameter bytes that every device holds in full."""
    total = rep = 0
    for x, s in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(shardings)):
        nbytes = x.size * x.dtype.itemsize
        total += nbytes
        if all(a is None for a in s.spec):
            rep += nbytes
    return rep / max(total, 1)

"""Sharded sparse training on 8 simulated CPU devices matches one device.

The device count must be fixed before jax initialises, so the test runs this file as a
script in a fresh process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5


def test_sharded_training_matches_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run(
        [sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("matches one device") == 3, r.stdout


def _worker():
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import hinm_jax
    from hinm_jax import optim

    assert len(jax.devices()) == 8, jax.devices()
    # explicit axes (jax.make_mesh's default): every config; auto (GSPMD) axes: one
    _check(jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2), 2)
    _check(jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2), 1)


def _check(mesh, n_configs):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import hinm_jax
    from hinm_jax import optim

    keys = jax.random.split(jax.random.key(0), 5)
    params = {
        "l0": {"kernel": jax.random.normal(keys[0], (64, 128)) / 8, "bias": jnp.zeros(128)},
        "l1": {"kernel": jax.random.normal(keys[1], (128, 128)) / 11, "bias": jnp.zeros(128)},
        "out": {"kernel": jax.random.normal(keys[2], (128, 16)) / 11, "bias": jnp.zeros(16)},
    }
    x = jax.random.normal(keys[3], (64, 64))
    y = jax.nn.one_hot(jax.random.randint(keys[4], (64,), 0, 16), 16)

    def forward(p, x):
        h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"])
        h = jax.nn.relu(h @ p["l1"]["kernel"] + p["l1"]["bias"])
        return h @ p["out"]["kernel"] + p["out"]["bias"]

    pattern = hinm_jax.HiNM(32, 0.5, 2, 4)  # the 16-wide head does not fit: it stays dense
    configs = {
        "STE + SR-STE + refresh": dict(sr_ste=True, refresh_every=2),
        "gradual": dict(sr_ste=True, refresh_every=1, schedule=optim.gradual(3), refresh_mode="vector"),
    }
    # data parallel over "data", every weight and its mask sharded over "model" (output axis)
    psh = jax.tree.map(lambda a: NamedSharding(mesh, P(*([None] * (a.ndim - 1)), "model")), params)
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    for name, cfg in list(configs.items())[:n_configs]:
        tx = optim.sparsify(optax.adam(1e-2), pattern, **cfg)

        def step(params, state, x, y):
            masks = optim.get_masks(state)

            def loss(p):
                logits = forward(optim.ste_apply(p, masks), x)
                return optax.softmax_cross_entropy(logits, y).mean()

            loss, grads = jax.value_and_grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        def run(init, step, p, x, y):
            state = init(p)
            for _ in range(STEPS):
                p, state, loss = step(p, state, x, y)
            return p, state, loss

        one = jax.devices()[0]
        single = run(jax.jit(tx.init), jax.jit(step), *jax.device_put((params, x, y), one))

        ssh = optim.state_sharding(jax.eval_shape(tx.init, params), psh)
        init = jax.jit(tx.init, in_shardings=(psh,), out_shardings=ssh)
        sstep = jax.jit(step, in_shardings=(psh, ssh, batch, batch), out_shardings=(psh, ssh, replicated))
        sharded = run(init, sstep, jax.device_put(params, psh), jax.device_put(x, batch), jax.device_put(y, batch))

        p, state, _ = sharded
        mask = optim.get_masks(state)["l1"]["kernel"]
        assert mask.mask.sharding.spec == P(None, "model"), mask.mask.sharding
        assert len(mask.mask.sharding.device_set) == 8
        assert mask.mask.addressable_shards[0].data.shape == (128, 64)  # really split
        assert p["l1"]["kernel"].sharding.spec == P(None, "model")
        assert int(state.count) == STEPS
        assert float(mask.density) == 0.25
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # adam: lr 1e-2
        kind = mesh.axis_types[0]
        print(f"{name}, {kind} axes: sharded (4 data x 2 model) matches one device")


if __name__ == "__main__":
    _worker()

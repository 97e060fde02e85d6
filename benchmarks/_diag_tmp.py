import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, 'tests/kernels')
from test_tree_attention import *
from test_tree_attention import _inputs
rng = np.random.default_rng(5)
length = 1000
kv_end = jnp.asarray(np.stack([random_tree_kv_end(rng, length, 200), packed_kv_end([300, 500, 200])]))
for hq, hkv, d in [(8, 4, 128), (8, 8, 128), (8, 4, 64)]:
  q, k, v, d_out = _inputs(5, 2, length, hq, hkv, d, jnp.float32)
  out, vjp = jax.vjp(lambda q, k, v: tree_attention(q, k, v, kv_end), q, k, v)
  g = vjp(d_out)
  with jax.default_matmul_precision("highest"):
    ref, rv = jax.vjp(lambda q, k, v: attention_reference(q, k, v, kv_end), q, k, v)
    rg = rv(d_out)
  print(hq, hkv, d, [rel_err(a, b) for a, b in zip((out, *g), (ref, *rg))],
        [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *g), (ref, *rg))], flush=True)
  if d == 128 and hkv == 4:
    err = jnp.abs(out - ref).max(axis=(2, 3))
    print('worst rows', np.argwhere(np.asarray(err) > 1e-3)[:20])

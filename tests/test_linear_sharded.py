"""Linear BCE and top-k with the labels sharded over 8 host devices.

One subprocess (JAX fixes its device count at start) runs, under
``jax.shard_map`` with `w` and `bias` sharded along the labels and `h`,
`positives` and `mask` replicated:

* value and ``jax.grad`` in h, w and bias equal the single-device call and
  the float64 reference, for tiles that divide the shard and that do not,
  with masked nan rows, "sum" and "mean", with and without ``check_vma``;
* ``top_k_labels`` returns the global top-k on every device, also with
  -inf scores filling k and a nan score (ranked as -inf);
* ``TopKMetric`` states ``psum``-ed over a batch axis equal ``merge``.
"""

from __future__ import annotations

import json
import textwrap

from absl.testing import absltest

from tests import _host_devices

_SCRIPT = textwrap.dedent(
  """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import bce_jax
    from tests import _host_devices, _reference as ref

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("labels",))
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b))
                             / max(np.max(np.abs(b)), 1e-30))
    out = {}
    rows, labels, dim = 11, 8 * 37, 6
    rng = np.random.default_rng(0)
    h = rng.normal(size=(rows, dim)).astype(np.float32)
    w = (rng.normal(size=(labels, dim)) / 3).astype(np.float32)
    b = rng.normal(size=labels).astype(np.float32)
    pos = rng.integers(-1, labels, (rows, 5)).astype(np.int32)
    mask = rng.uniform(size=rows) < 0.7
    padded = np.where(mask[:, None], h, np.nan).astype(np.float32)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    for block, reduction, check in [(16, "sum", True), (None, "mean", True), (5, "sum", False)]:
      kw = dict(block_size=block, label_reduction=reduction)

      def sharded(h, w, b, p, m):
        return bce_jax.linear_binary_crossentropy(h, w, p, bias=b, mask=m, axis_name="labels", **kw)

      mapped = jax.shard_map(sharded, mesh=mesh,
                             in_specs=(P(), P("labels"), P("labels"), P(), P()),
                             out_specs=P(), check_vma=check)
      grad = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 2)))
      with jax.set_mesh(mesh):
        value, grads = grad(put(padded, P()), put(w, P("labels")), put(b, P("labels")),
                            put(pos, P()), put(mask, P()))
      one = jax.jit(jax.value_and_grad(
          lambda h, w, b: bce_jax.linear_binary_crossentropy(h, w, pos, bias=b, mask=mask, **kw),
          argnums=(0, 1, 2)))
      value1, grads1 = one(padded, w, b)
      want = ref.linear_bce(h[mask], w, pos[mask], b, label_reduction=reduction)
      dh = np.asarray(grads[0])
      out[f"loss/{block}/{reduction}/{check}"] = {
          "value_vs_one": rel(value, np.float64(value1)),
          "value_vs_ref": rel(value, want[0]),
          "grads_vs_one": max(rel(g, np.asarray(g1, np.float64)) for g, g1 in zip(grads, grads1)),
          "grads_vs_ref": max(rel(dh[mask], want[1]), rel(grads[1], want[2]),
                              rel(grads[2], want[3])),
          "masked_dh_zero": bool(np.all(dh[~mask] == 0)),
      }

    # top-k over the shards, every device's copy; then a bias that leaves 4
    # finite scores (in shards 1 and 5) and a nan (shard 2): the rest are -inf
    # ids, lowest first, with the nan ranked as -inf.
    odd = np.full(labels, -np.inf, np.float32)
    odd[[40, 41, 200, 201]] = b[[40, 41, 200, 201]]
    odd[80] = np.nan
    for case, block, bias in ((None, None, b), (7, 7, b), ("inf_nan", 5, odd)):
      def topk(h, w, b):
        s, i = bce_jax.top_k_labels(h, w, 6, bias=b, block_size=block, axis_name="labels")
        return s, i, i[None]

      mapped = jax.shard_map(topk, mesh=mesh, in_specs=(P(), P("labels"), P("labels")),
                             out_specs=(P(), P(), P("labels")))
      with jax.set_mesh(mesh):
        scores, ids, copies = jax.jit(mapped)(put(h, P()), put(w, P("labels")),
                                              put(bias, P("labels")))
      dense = h.astype(np.float64) @ w.T.astype(np.float64) + bias
      want = np.argsort(-np.where(np.isnan(dense), -np.inf, dense), axis=1, kind="stable")[:, :6]
      want_scores = np.take_along_axis(dense, want, axis=1)
      finite = np.isfinite(want_scores)
      copies = np.asarray(copies)
      out[f"topk/{case}"] = {
          "ids_equal": bool(np.array_equal(ids, want)),
          "copies_equal": bool(all(np.array_equal(c, want) for c in copies)),
          "scores_rel": rel(np.asarray(scores)[finite], want_scores[finite]),
          "nonfinite_equal": bool(np.array_equal(np.asarray(scores)[~finite],
                                                 want_scores[~finite], equal_nan=True)),
      }

    # The metric: states psum-ed over a batch axis equal one update.
    metric = bce_jax.TopKMetric(ks=(1, 3))
    ids = np.stack([rng.permutation(labels)[:3] for _ in range(64)]).astype(np.int32)
    positives = rng.integers(-1, labels, (64, 4)).astype(np.int32)
    mesh_b = jax.make_mesh((8,), ("batch",))
    def shard_state(i, p):
      return jax.lax.psum(metric.update(metric.init(), i, p), "batch")
    mapped = jax.shard_map(shard_state, mesh=mesh_b, in_specs=(P("batch"), P("batch")),
                           out_specs=P())
    with jax.set_mesh(mesh_b):
      rows_b = NamedSharding(mesh_b, P("batch"))
      summed = jax.jit(mapped)(jax.device_put(ids, rows_b), jax.device_put(positives, rows_b))
    whole = metric.result(metric.update(metric.init(), ids, positives))
    got = metric.result(summed)
    out["metric"] = {"rel": max(abs(float(got[k]) - float(whole[k])) for k in whole)}
    print(json.dumps(out))
    """
)


class EightDevicesTest(absltest.TestCase):
  def test_label_shards_equal_one_device(self):
    proc = _host_devices.run(_SCRIPT, devices=8, timeout=300)
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    self.assertEqual(proc.returncode, 0, output)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertLen(results, 7, output)
    for case, result in results.items():
      with self.subTest(case=case):
        if case.startswith("loss/"):
          self.assertLess(result["value_vs_one"], 1e-6, result)
          self.assertLess(result["value_vs_ref"], 3e-6, result)
          self.assertLess(result["grads_vs_one"], 1e-5, result)
          self.assertLess(result["grads_vs_ref"], 3e-6, result)
          self.assertTrue(result["masked_dh_zero"], result)
        elif case.startswith("topk/"):
          self.assertTrue(result["ids_equal"], result)
          self.assertTrue(result["copies_equal"], result)
          self.assertLess(result["scores_rel"], 1e-5, result)
          self.assertTrue(result["nonfinite_equal"], result)
        else:
          self.assertLess(result["rel"], 1e-6, result)


if __name__ == "__main__":
  absltest.main()

"""Linear BCE with the labels sharded over two processes (gloo on CPU).

Two processes joined by ``jax.distributed.initialize`` on 127.0.0.1, two
host devices each, one 4-device mesh over the labels: each process holds
only its half of `w` and `bias`. Every process checks that the value,
``dh`` (summed over the devices of both processes), its own rows of ``dw``
and ``dbias``, and the global ``top_k_labels`` equal a single-device run
on the whole label matrix, and prints one JSON line.

Skipped only where jaxlib has no gloo collectives or no loopback TCP, as
the several-hosts example's test is.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

from absl.testing import absltest

from tests.test_multihost import ROOT, TIMEOUT_S, _cannot_run_reason, _env

PROCESSES, DEVICES_PER_PROCESS = 2, 2

_WORKER = textwrap.dedent(
  """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import bce_jax

    process, coordinator = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=2,
                               process_id=process, initialization_timeout=90)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = jax.make_mesh((4,), ("labels",))
    rows, labels, dim = 9, 4 * 29, 5
    rng = np.random.default_rng(0)  # the same data in every process
    h = rng.normal(size=(rows, dim)).astype(np.float32)
    w = (rng.normal(size=(labels, dim)) / 2).astype(np.float32)
    b = rng.normal(size=labels).astype(np.float32)
    pos = rng.integers(-1, labels, (rows, 4)).astype(np.int32)
    mask = np.arange(rows) != 3
    h[3] = np.nan  # an excluded row

    def place(a, spec):  # each process builds only its own shards
      sharding = NamedSharding(mesh, spec)
      return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    def sharded(h, w, b, p, m):
      loss = bce_jax.linear_binary_crossentropy(
          h, w, p, bias=b, mask=m, block_size=8, axis_name="labels")
      s, i = bce_jax.top_k_labels(h, w, 4, bias=b, block_size=8, axis_name="labels")
      return loss, (s, i)

    mapped = jax.shard_map(sharded, mesh=mesh,
                           in_specs=(P(), P("labels"), P("labels"), P(), P()),
                           out_specs=(P(), (P(), P())))
    step = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 2), has_aux=True))
    with jax.set_mesh(mesh):
      (value, (scores, ids)), (dh, dw, db) = step(
          place(h, P()), place(w, P("labels")), place(b, P("labels")), place(pos, P()),
          place(mask, P()))

    local = jax.local_devices()[0]
    with jax.default_device(local):
      value1, (dh1, dw1, db1) = jax.jit(jax.value_and_grad(
          lambda h, w, b: bce_jax.linear_binary_crossentropy(h, w, pos, bias=b, mask=mask),
          argnums=(0, 1, 2)))(h, w, b)
      _, ids1 = bce_jax.top_k_labels(h, w, 4, bias=b)

    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                             / max(float(np.max(np.abs(np.asarray(b, np.float64)))), 1e-30))
    first = lambda a: np.asarray(a.addressable_data(0))
    own = {"dw": 0.0, "db": 0.0}
    for name, got, want in (("dw", dw, dw1), ("db", db, db1)):
      for shard in got.addressable_shards:  # this process's rows only
        own[name] = max(own[name], rel(shard.data, np.asarray(want)[shard.index]))
    out = {
        "process": process,
        "value": rel(first(value), value1),
        "dh": rel(first(dh), dh1),
        "dh_masked_zero": bool(np.all(first(dh)[3] == 0)),
        "dw": own["dw"],
        "db": own["db"],
        "top_k": bool(np.array_equal(first(ids), ids1)),
    }
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class TwoProcessesTest(absltest.TestCase):
  def test_label_shards_across_processes_equal_one_device(self):
    reason = _cannot_run_reason()
    if reason:
      self.skipTest(reason)
    coordinator = f"127.0.0.1:{_free_port()}"
    env = _env(DEVICES_PER_PROCESS)
    procs = [
      subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(p), coordinator],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for p in range(PROCESSES)
    ]
    outputs = []
    try:
      for proc in procs:
        outputs.append(proc.communicate(timeout=TIMEOUT_S))
    finally:
      for proc in procs:  # only the two started here
        if proc.poll() is None:
          proc.kill()
          proc.communicate()
    text = "\n".join(f"--- process {i}\n{o}\n{e[-3000:]}" for i, (o, e) in enumerate(outputs))
    if "gloo_tcp_collectives only implemented" in text:
      self.skipTest("this jaxlib has no gloo CPU collectives")
    for i, proc in enumerate(procs):
      self.assertEqual(proc.returncode, 0, text)
      lines = [line for line in outputs[i][0].splitlines() if line.startswith("RESULT ")]
      self.assertLen(lines, 1, text)
      result = json.loads(lines[0][len("RESULT ") :])
      with self.subTest(process=i):
        self.assertEqual(result["process"], i)
        self.assertLess(result["value"], 1e-6, result)
        for name in ("dh", "dw", "db"):
          self.assertLess(result[name], 1e-5, result)
        self.assertTrue(result["dh_masked_zero"], result)
        self.assertTrue(result["top_k"], result)


if __name__ == "__main__":
  absltest.main()

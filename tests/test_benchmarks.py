"""The GPU benchmark's smoke run, and the guards and timing it is built on.

``benchmarks/gpu.py --smoke`` takes every code path of the GPU benchmark at
tiny sizes on the CPU (one subprocess, ~20 s on 2 cores); the test checks
that every section and cell is in its JSON and markdown, measured, and that
no cell failed. Keras is left out of that run (``--skip-peers keras``): its
import alone takes seconds, and its code path is the one ``bench.py`` runs.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Literal
from unittest import mock

from absl.testing import absltest

import bce_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
TIMEOUT_S = 300


def _import_benchmarks():
  """The benchmark modules (they import each other by their bare names)."""
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
  import gpu_common
  import timing

  return gpu_common, timing


def _import_sweeps():
  _import_benchmarks()
  import gpu_sweeps

  return gpu_sweeps


class SmokeRunTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    out = pathlib.Path(cls.tmp.name) / "smoke.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(BENCHMARKS / "gpu.py"), "--smoke", "--out", str(out)]
    cmd += ["--skip-peers", "keras"]
    start = time.perf_counter()
    cls.proc = subprocess.run(
      cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    cls.seconds = time.perf_counter() - start
    cls.output = f"--- stdout\n{cls.proc.stdout[-6000:]}\n--- stderr\n{cls.proc.stderr[-6000:]}"
    cls.record = json.loads(out.read_text()) if out.exists() else None
    md = out.with_suffix(".md")
    cls.markdown = md.read_text() if md.exists() else ""

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.assertEqual(self.proc.returncode, 0, self.output)
    self.assertIsNotNone(self.record, self.output)

  def test_every_section_is_there_and_no_cell_failed(self):
    sections = self.record["sections"]
    expected = {"ceilings", "flat", "probabilities", "focal", "eager", "pairwise", "linear"}
    self.assertEqual(set(sections), expected, self.output)
    self.assertEqual(self.record["skipped_cells"], 0)
    for name, cells in sections.items():
      for cell in cells:
        with self.subTest(section=name, cell=cell):
          self.assertNotIn("status", cell)
          self.assertNotIn("skipped", cell)
          for impl, entry in cell.get("impls", {}).items():
            self.assertFalse(entry.get("status", "").startswith("error"), (impl, entry))

  def test_flat_cells_measure_bce_jax_its_floors_and_its_peers(self):
    cells = self.record["sections"]["flat"]
    keys = {(c["shape"], c["dtype"], c["path"], c["mode"]) for c in cells}
    for path in ("mean", "weight", "mask"):
      for mode in ("forward", "value_and_grad"):
        self.assertIn(("[N/8,8]", "float32", path, mode), keys)
    self.assertIn(("[N/8,8]", "float32", "metric", "forward"), keys)
    self.assertIn(("[N/8,8]", "bfloat16", "mean", "value_and_grad"), keys)
    self.assertIn(("[N/512,64,8]", "float32", "mask", "forward"), keys)
    self.assertIn(("[N]", "float32", "weight", "forward"), keys)  # the narrow section's plan
    have_optax = importlib.util.find_spec("optax") is not None
    for cell in cells:
      impls = cell["impls"]
      with self.subTest(cell=(cell["shape"], cell["dtype"], cell["path"], cell["mode"])):
        self.assertGreater(impls["bce_jax"]["seconds"], 0)
        floor = "vag floor" if cell["mode"] == "value_and_grad" else "read floor"
        self.assertGreater(impls[floor]["seconds"], 0)
        self.assertEqual(impls["keras"]["status"], "missing: left out (--skip-peers)")
        if have_optax:
          self.assertGreater(impls["optax"]["seconds"], 0)
          self.assertLess(impls["optax"]["rel_diff"], 5e-2)
        if cell["path"] == "mean":
          self.assertIn("torch", impls)
        self.assertEqual(cell["mismatches"], [])

  def test_ceilings_and_sweeps(self):
    ceilings = self.record["ceilings"]
    for key in ("copy_bytes_per_s", "read_bytes_per_s", "matmul_flop_per_s"):
      self.assertGreater(ceilings[key], 0, key)
    pairwise = self.record["sections"]["pairwise"]
    self.assertEqual([c["dtype"] for c in pairwise], ["bfloat16"])
    for cell in pairwise:
      impls = cell["impls"]
      for name in ("default", "block 32", "dense"):
        self.assertGreater(impls[name]["flop_per_s"], 0, name)
        self.assertIn("temp", impls[name]["memory"])
      # The kernel's implementation= values, or why there are none.
      extra = [k for k in impls if k.startswith("implementation=")]
      self.assertNotEqual(extra, [])
      if "implementation" not in inspect.signature(bce_jax.pairwise_sigmoid_loss).parameters:
        self.assertEqual(
          impls["implementation="]["status"],
          "not available: pairwise_sigmoid_loss has no implementation= argument",
        )
      self.assertLess(impls["default"]["value_rel_diff"], 2e-2)
    for cell in self.record["sections"]["linear"]:
      self.assertGreater(cell["impls"]["dense optax"]["seconds"], 0)
      ours = cell["impls"]["bce_jax"]
      self.assertTrue("seconds" in ours or ours["status"].startswith("not available"), ours)

  def test_eager_probabilities_and_focal(self):
    (eager,) = self.record["sections"]["eager"]
    calls = {r["call"] for r in eager["rows"]}
    self.assertIn(eager["baseline"], calls)
    self.assertIn("BinaryCrossentropy()(y, x)", calls)
    for cell in self.record["sections"]["probabilities"]:
      self.assertGreater(cell["impls"]["naive clip+log"]["seconds"], 0)
      self.assertLess(cell["impls"]["naive clip+log"]["rel_diff"], 1e-5)
    for cell in self.record["sections"]["focal"]:
      self.assertGreater(cell["impls"]["bce_jax"]["seconds"], 0)

  def test_markdown_has_every_table(self):
    for heading in (
      "## Ceilings",
      "## Targets",
      "## BCE from logits",
      "## From probabilities",
      "## Focal",
      "## Eager calls",
      "## Pairwise sigmoid loss",
      "## Linear BCE",
    ):
      self.assertIn(heading, self.markdown)
    self.assertIn("| value_and_grad <= 1.15x the vag floor, every cell |", self.markdown)
    self.assertIn("peer **keras** missing", self.markdown)


class GuardTest(absltest.TestCase):
  def test_a_failing_implementation_is_recorded_and_the_others_timed(self):
    gpu_common, timing = _import_benchmarks()

    def broken():
      raise ValueError("no such kernel")

    calls = {"fine": timing.Pipelined(lambda: 1.0, wait=lambda v: v), "broken": broken}
    out = gpu_common.measure(calls | {"absent": "not installed"}, gpu_common.SMOKE_EFFORT)
    self.assertGreater(out["fine"]["seconds"], 0)
    self.assertEqual(out["broken"]["status"], "error: ValueError: no such kernel")
    self.assertEqual(out["absent"]["status"], "missing: not installed")

  def test_out_of_memory_is_named(self):
    gpu_common, _ = _import_benchmarks()
    e = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 bytes")
    self.assertTrue(gpu_common.describe_error(e).startswith("out of memory: RESOURCE_EXHAUSTED"))

  def test_a_failing_cell_is_recorded_and_the_budget_skips_the_rest(self):
    gpu_common, _ = _import_benchmarks()
    run = gpu_common.Run(budget_s=60.0)

    def fails():
      raise MemoryError("RESOURCE_EXHAUSTED: out of memory")

    self.assertTrue(run.cell("s", {"i": 0}, fails)["status"].startswith("out of memory"))
    self.assertEqual(run.cell("s", {"i": 1}, lambda: {"x": 1})["x"], 1)
    run.budget_s = 0.0
    skipped = run.cell("s", {"i": 2}, lambda: {"x": 2})
    self.assertNotIn("x", skipped)
    self.assertIn("budget", skipped["skipped"])
    self.assertEqual([c["i"] for c in run.sections["s"]], [0, 1, 2])
    self.assertEqual(run.skipped, 1)


class FeatureDetectionTest(absltest.TestCase):
  """Implementations being built elsewhere join the sweeps as soon as they exist."""

  def _pairwise(self, **kwargs) -> dict:
    gpu_common, _ = _import_benchmarks()
    run = gpu_common.Run(budget_s=600.0)
    sweeps = _import_sweeps()
    sweeps.pairwise_cells(run, [16], 8, ["float32"], [], [], gpu_common.SMOKE_EFFORT, None)
    (cell,) = run.sections["pairwise"]
    return cell["impls"]

  def test_pairwise_times_each_implementation_its_annotation_names(self):
    real = bce_jax.pairwise_sigmoid_loss
    seen = []

    def with_kernel(
      x, y, *, scale, bias, block_size=None, implementation: Literal["xla", "fused"] = "xla"
    ):
      seen.append(implementation)
      return real(x, y, scale=scale, bias=bias, block_size=block_size)

    with mock.patch.object(bce_jax, "pairwise_sigmoid_loss", with_kernel):
      impls = self._pairwise()
    self.assertNotIn("implementation=", impls)
    self.assertNotIn("implementation=xla", impls)  # the default is the "default" column
    self.assertGreater(impls["implementation=fused"]["seconds"], 0)
    self.assertLess(impls["implementation=fused"]["value_rel_diff"], 1e-5)
    self.assertIn("fused", seen)

  def test_linear_bce_is_timed_once_it_exists_and_dense_stops_at_the_memory_limit(self):
    gpu_common, _ = _import_benchmarks()
    sweeps = _import_sweeps()
    optax = sweeps.peers.get("optax")
    if optax is None:
      self.skipTest("needs optax: pip install -e '.[bench]'")

    def linear(h, w, positives):  # a stand-in with the documented signature's first arguments
      return sweeps.dense_linear(optax)(h, w, positives)

    run = gpu_common.Run(budget_s=600.0)
    with (
      mock.patch.object(bce_jax, "linear_binary_crossentropy", linear, create=True),
      mock.patch.object(gpu_common, "device_memory_limit", lambda: 4000),
    ):
      sweeps.linear_cells(run, [16, 64, 128], 4, 8, gpu_common.SMOKE_EFFORT, None)
    small, big, bigger = (c["impls"] for c in run.sections["linear"])
    self.assertGreater(small["bce_jax"]["seconds"], 0)
    self.assertLess(small["bce_jax"]["value_rel_diff"], 1e-6)
    self.assertGreater(small["dense optax"]["seconds"], 0)
    self.assertTrue(big["dense optax"]["status"].startswith("out of memory: needs"), big)
    self.assertEqual(bigger["dense optax"]["status"], "out of memory already at C = 64")


class PipelinedTimingTest(absltest.TestCase):
  def test_one_wait_per_sample_of_k_calls(self):
    _, timing = _import_benchmarks()
    started, waited = [], []
    call = timing.Pipelined(lambda: started.append(1) or len(started), wait=waited.append)
    timing.sample(call, 7)
    self.assertEqual((len(started), waited), (7, [7]))  # waited once, on the last result

  def test_interleaved_timing_waits_once_per_sample(self):
    _, timing = _import_benchmarks()
    waited = []
    call = timing.Pipelined(lambda: 0, wait=waited.append)
    result = timing.time_interleaved({"c": call}, repeats=3, warmup=1, inner=5)
    self.assertLen(result["c"].samples, 3)
    self.assertLen(waited, 1 + 3)  # the warm-up's sample, then one per repeat


class OddRowsTest(absltest.TestCase):
  def test_each_available_peer_is_timed_on_odd_and_even_rows(self):
    _import_benchmarks()
    import narrow
    import peers

    impls = peers.implementations("bce")
    available = [name for name, impl in impls.items() if isinstance(impl, peers.Impl)]
    rows = narrow.run_odd(2048, 8, ["float32"], ["value_and_grad"], 2, on_row=lambda r: None)
    self.assertEqual([r["impl"] for r in rows], available)
    self.assertEqual(available[0], "bce_jax")
    if importlib.util.find_spec("optax") is not None:
      self.assertIn("optax", available)
    for row in rows:
      with self.subTest(impl=row["impl"]):
        self.assertEqual((row["rows"], row["width"]), (256, 8))  # 2048 / 8, a multiple of 8
        self.assertGreater(row["even_seconds"], 0)
        self.assertGreater(row["odd_seconds"], 0)
        expected = row["odd_seconds"] / 257 / (row["even_seconds"] / 256)
        self.assertAlmostEqual(row["x_even"], expected)
    self.assertIn("[257,8]", narrow.format_odd_row(rows[0]))


if __name__ == "__main__":
  absltest.main()

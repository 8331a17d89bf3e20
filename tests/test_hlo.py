"""Guards the speed of the kernel through the optimized HLO, without timing.

On CPU the BCE of N elements is memory-bound: what costs is how many
full-size arrays XLA writes, and how many transcendental ops it evaluates
per element. These tests compile the loss (and its ``value_and_grad``) for
a large float32 vector and read XLA's optimized HLO text:

* the loss must take exactly one ``exponential`` and one ``log-plus-one``;
* no array of N elements may be materialized besides the gradient itself:
  every instruction of a non-fused computation (the entry, or anything it
  calls that is not a fusion body or a reducer) with an ``f32[N]`` result,
  other than parameters, tuples, ``get-tuple-element`` and ``bitcast``,
  is a full-size write.

XLA on CPU writes such a temporary for any value that the loss's reduction
and the gradient share (an ``exp``, a ``1 - y``, even a broadcast
constant), which is what the custom JVP of ``_functional`` avoids. The same
inspector run on optax's formulation and on plain autodiff must flag
temporaries, which shows it would catch a regression.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import bce_jax

N = 1 << 20  # large enough that XLA never unrolls or keeps it in registers

# An instruction: `[ROOT] %name = TYPE opcode(operands), attributes`. TYPE is
# a shape such as `f32[1048576]{0}` or a tuple `(f32[], f32[1048576]{0})`.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>\(.*?\)|\S+)\s+(?P<op>[\w\-]+)\("
)
_COMPUTATION = re.compile(r"^\s*(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*(?:\(.*\))?.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply)=\{?%?(?P<names>[\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")
_NO_WRITE = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant"}


@dataclasses.dataclass
class Report:
  """What the optimized HLO of a function does with arrays of N elements."""

  exp_count: int
  log1p_count: int
  log_count: int
  # (computation, instruction, opcode) for each full-size array written.
  full_size_writes: list[tuple[str, str, str]]
  # Names of the entry's results that are full-size (the gradient).
  full_size_outputs: list[str]
  loss_exp_count: int
  loss_log1p_count: int


def _parse(text: str) -> tuple[dict[str, list[dict]], str]:
  """Computation name -> its instructions; and the entry's name."""
  computations: dict[str, list[dict]] = {}
  entry = ""
  current = None
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m and "=" not in line.split("{", 1)[0].split("(", 1)[0]:
        current = m.group("name")
        computations[current] = []
        if m.group("entry"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if m:
      computations[current].append(
          {
              "name": m.group("name"),
              "type": m.group("type"),
              "op": m.group("op"),
              "root": line.lstrip().startswith("ROOT"),
              "line": line,
          }
      )
  return computations, entry


def _callees(instr: dict) -> list[str]:
  out = []
  for m in _CALLS.finditer(instr["line"]):
    out += [n.strip().lstrip("%") for n in m.group("names").split(",")]
  return out


def inspect(fn, *args) -> Report:
  """Compiles `fn(*args)` with jit and reads its optimized HLO."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  computations, entry = _parse(text)
  assert entry, "no ENTRY computation found in the HLO text"

  # Computations inlined into a fusion or used as a reducer write nothing:
  # collect them transitively; the rest materialize their instructions.
  fused: set[str] = set()
  stack = []
  for instrs in computations.values():
    for instr in instrs:
      if instr["op"] == "fusion" or "to_apply=" in instr["line"]:
        stack += _callees(instr)
  while stack:
    name = stack.pop()
    if name in fused or name not in computations:
      continue
    fused.add(name)
    for instr in computations[name]:
      stack += _callees(instr)

  shape = re.compile(rf"\bf32\[{N}\]")
  writes = []
  for comp, instrs in computations.items():
    if comp in fused:
      continue
    for instr in instrs:
      if instr["op"] not in _NO_WRITE and shape.search(instr["type"]):
        writes += [(comp, instr["name"], instr["op"])] * len(shape.findall(instr["type"]))

  def count(op: str, names) -> int:
    return sum(1 for c in names for i in computations[c] if i["op"] == op)

  # The loss: the computations behind an instruction that reduces N to a scalar.
  loss_comps: set[str] = set()
  for comp, instrs in computations.items():
    if any(i["op"] == "reduce" and re.match(r"f32\[\]", i["type"]) for i in instrs):
      loss_comps.add(comp)

  root = next(i for i in computations[entry] if i["root"])
  by_name = {i["name"]: i for i in computations[entry]}
  if root["op"] == "tuple":
    operands = re.findall(r"%([\w.\-]+)", root["line"].split("(", 1)[1])
  else:
    operands = [root["name"]]
  outputs = [o for o in operands if o in by_name and shape.search(by_name[o]["type"])]
  return Report(
      exp_count=count("exponential", computations),
      log1p_count=count("log-plus-one", computations),
      log_count=count("log", computations),
      full_size_writes=writes,
      full_size_outputs=outputs,
      loss_exp_count=count("exponential", loss_comps),
      loss_log1p_count=count("log-plus-one", loss_comps),
  )


def _data():
  x = jnp.asarray(np.linspace(-30, 30, N, dtype=np.float32))
  y = jnp.asarray((np.arange(N) % 2).astype(np.float32))
  return x, y


def _mean_logits_loss(x, y):
  return bce_jax.binary_crossentropy(y, x, from_logits=True).mean()


def _grad_problems(report: Report) -> list[str]:
  """Why a value_and_grad report is not the fused kernel ([] if it is)."""
  problems = []
  if report.loss_exp_count != 1 or report.loss_log1p_count != 1:
    problems.append(
        f"loss takes {report.loss_exp_count} exp and {report.loss_log1p_count} log1p, want 1 and 1"
    )
  if report.log1p_count != 1:
    problems.append(f"{report.log1p_count} log1p in all, want 1")
  if report.exp_count > 2:
    problems.append(f"{report.exp_count} exp in all, want <= 2 (loss and gradient)")
  if len(report.full_size_writes) != 1 or len(report.full_size_outputs) != 1:
    problems.append(
        f"full-size writes {report.full_size_writes}, want only the gradient "
        f"{report.full_size_outputs}"
    )
  elif report.full_size_writes[0][1] != report.full_size_outputs[0]:
    problems.append(f"the full-size write {report.full_size_writes} is not the gradient")
  return problems


def _forward_problems(report: Report) -> list[str]:
  problems = []
  if report.exp_count != 1 or report.log1p_count != 1:
    problems.append(f"{report.exp_count} exp and {report.log1p_count} log1p, want 1 and 1")
  if report.full_size_writes:
    problems.append(f"full-size temporaries {report.full_size_writes}, want none")
  return problems


class HloTest(absltest.TestCase):

  def test_forward_from_logits_is_one_fused_reduction(self):
    report = inspect(_mean_logits_loss, *_data())
    self.assertEqual(_forward_problems(report), [], msg=report)

  def test_value_and_grad_writes_only_the_gradient(self):
    report = inspect(jax.value_and_grad(_mean_logits_loss), *_data())
    self.assertEqual(_grad_problems(report), [], msg=report)

  def test_loss_object_value_and_grad_writes_only_the_gradient(self):
    loss = bce_jax.BinaryCrossentropy(from_logits=True)
    report = inspect(jax.value_and_grad(lambda x, y: loss(y, x)), *_data())
    self.assertEqual(_grad_problems(report), [], msg=report)

  def test_forward_from_probabilities_writes_no_temporary(self):
    # A two-sided clip would be written out as a full-size temporary.
    x, y = _data()
    report = inspect(lambda p, y: bce_jax.binary_crossentropy(y, p).mean(), jax.nn.sigmoid(x), y)
    self.assertEqual(report.full_size_writes, [], msg=report)
    self.assertEqual(report.log_count, 2, msg=report)

  def test_column_input_is_computed_flat(self):
    # XLA's CPU reduction of a [N, 1] array runs ~30x slower than of [N]:
    # the kernel flattens, so past the parameters no op has shape [N, 1].
    x, y = (a.reshape(N, 1) for a in _data())
    text = jax.jit(_mean_logits_loss).lower(x, y).compile().as_text()
    computations, _ = _parse(text)
    column = re.compile(rf"\bf32\[{N},1\]")
    ops = sorted(
        {i["op"] for instrs in computations.values() for i in instrs if column.search(i["type"])}
    )
    self.assertContainsSubset(ops, {"parameter", "bitcast", "reshape", "opt-barrier"}, msg=ops)
    self.assertEqual(_forward_problems(inspect(_mean_logits_loss, x, y)), [])

  def test_inspector_flags_plain_autodiff(self):
    # Negative control without optional dependencies: the same formula
    # differentiated by JAX shares exp(-|x|) between loss and gradient.
    def plain(x, y):
      losses = jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
      return losses.mean()

    report = inspect(jax.value_and_grad(plain), *_data())
    self.assertNotEqual(_grad_problems(report), [], msg=report)

  def test_inspector_flags_optax(self):
    try:
      import optax  # noqa: PLC0415
    except ImportError:
      self.skipTest("optax is not installed")
    x, y = _data()
    forward = inspect(lambda x, y: optax.sigmoid_binary_cross_entropy(x, y).mean(), x, y)
    grad = inspect(
        jax.value_and_grad(lambda x, y: optax.sigmoid_binary_cross_entropy(x, y).mean()), x, y
    )
    # optax pays 2 exp + 2 log1p forward and writes temporaries with the gradient.
    self.assertNotEqual(_forward_problems(forward), [], msg=forward)
    self.assertNotEqual(_grad_problems(grad), [], msg=grad)


if __name__ == "__main__":
  absltest.main()

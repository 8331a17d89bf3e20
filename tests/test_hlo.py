"""Guards the speed of the kernel's fast path through XLA's optimized HLO, without timing.

On CPU the BCE of N elements is memory-bound: what costs is how many arrays of
N elements XLA writes, and how many transcendental ops it evaluates per
element. Each cell of a matrix (input shape x entry point x dtype x forward or
``value_and_grad`` w.r.t. the logits) is compiled once for N = 2**20 elements,
and its optimized HLO text is read:

* The fallback: every entry point reduces through one ``conditional`` whose
  first branch passes the fast result through and whose other branch
  recomputes the loss safely (infinite logits, nan padding); a scalar loss
  has a second one, taken when its float32 total overflows. The conditionals
  must be there, and the safe branches are left out of everything below:
  they only run when the fast result is nan or infinite.
* Writes: on the fast path, every instruction of a computation that is not a
  fusion body or a reducer (the entry, the conditional's fast branch), other
  than parameters, constants, tuples, ``get-tuple-element``, ``bitcast``,
  ``opt-barrier`` and the ``conditional`` itself, writes its result. A
  full-size write is one of N elements of any dtype (an ``f32[N]`` convert of
  bfloat16 inputs, a ``pred[N]`` mask); a row-size write is one of `M`
  elements, the per-sample loss count, when 1 < M < N. Each is an *output* if
  the entry returns it (through bitcasts, tuples and the conditional's fast
  branch), else a *temporary*. Ideally a scalar loss writes nothing full-size,
  per-sample losses write only themselves, and ``value_and_grad`` writes only
  the gradient.
* Transcendentals: the fast path's ``exponential``, ``log``, ``log-plus-one``
  (and friends), grouped by the fusion they sit in: the *reduction* (a
  fusion that reduces), the *output* fusion, or a *temporary*. Ideally the
  logits loss takes one ``exponential`` and one ``log-plus-one`` inside its
  reduction and the gradient one ``exponential`` of its own (a shared
  ``exp`` would be written out as a full-size temporary); probabilities take
  one ``log`` and one ``log-plus-one``.

Cells that write more than the ideal today assert the exact figures measured
(``_BASELINES``), so that any further write fails; a fix fails too,
and then the baseline shrinks to the ideal.

The figures describe XLA as shipped with jax/jaxlib 0.10.x on CPU: fusion
decisions change between releases and backends, so on another jax minor
version or a non-CPU backend the module is skipped.

The negative controls (plain autodiff of the same formula, and optax) must be
flagged by the same inspector, which shows that it would catch a regression.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import re

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

import bce_jax

N = 1 << 20  # large enough that XLA never unrolls or keeps it in registers

_JAX_MINOR = tuple(jax.__version__.split(".")[:2])
_APPLIES = _JAX_MINOR == ("0", "10") and jax.default_backend() == "cpu"
_SKIP_REASON = (
  f"the HLO figures were measured with jax/jaxlib 0.10.x on CPU and do not apply to jax "
  f"{jax.__version__} on {jax.default_backend()}"
)

# --------------------------------------------------------------------------
# Reading optimized HLO text.

_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{$")
_ASSIGN = re.compile(r"^(?P<root>ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_OPERAND = re.compile(r"%(?P<name>[\w.\-]+)")
# Attributes naming called computations: `calls=%f`, `branch_computations={%a, %b}`, ...
_CALLED = re.compile(
  r"\b(?P<attr>calls|to_apply|branch_computations|true_computation|false_computation|body"
  r"|condition|called_computations)=(?P<value>\{[^}]*\}|%?[\w.\-]+)"
)
_TRANSCENDENTAL = frozenset(
  {
    "exponential",
    "exponential-minus-one",
    "log",
    "log-plus-one",
    "logistic",
    "tanh",
    "power",
    "sqrt",
    "rsqrt",
  }
)
# Ops whose result is not a buffer they write: aliases of their operands.
_NO_WRITE = frozenset(
  {
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "opt-barrier",
    "conditional",
    "call",
    "while",
  }
)


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction: `[ROOT] %name = TYPE op(operands), attributes`."""

  name: str
  type: str
  op: str
  operands: tuple[str, ...]
  called: dict[str, tuple[str, ...]]
  root: bool
  line: str


def _split_balanced(text: str) -> tuple[str, str]:
  """`text` starting with "(": the parenthesized prefix and the rest."""
  depth = 0
  for i, char in enumerate(text):
    depth += char == "("
    depth -= char == ")"
    if depth == 0:
      return text[: i + 1], text[i + 1 :]
  return text, ""


def _parse_instruction(line: str) -> Instruction | None:
  m = _ASSIGN.match(line)
  if not m:
    return None
  rest = line[m.end() :]
  if rest.startswith("("):  # a tuple type
    typ, rest = _split_balanced(rest)
  else:
    typ, _, rest = rest.partition(" ")
  op = re.match(r"\s*(?P<op>[\w\-]+)", rest)
  if not op:
    return None
  operands, attributes = _split_balanced(rest[op.end() :])
  called = {}
  for c in _CALLED.finditer(attributes):
    names = (n.strip().lstrip("%") for n in c.group("value").strip("{}").split(","))
    called[c.group("attr")] = tuple(n for n in names if n)
  return Instruction(
    name=m.group("name"),
    type=typ,
    op=op.group("op"),
    operands=tuple(o.group("name") for o in _OPERAND.finditer(operands)),
    called=called,
    root=bool(m.group("root")),
    line=line,
  )


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """Computation name -> its instructions; and the entry computation's name."""
  computations: dict[str, list[Instruction]] = {}
  entry = ""
  current = None
  for line in text.splitlines():
    line = line.strip()
    if current is None:
      m = _HEADER.match(line)
      if m and "=" not in line.split("(", 1)[0]:
        current = m.group("name")
        computations[current] = []
        if m.group("entry"):
          entry = current
    elif line == "}":
      current = None
    elif (instruction := _parse_instruction(line)) is not None:
      computations[current].append(instruction)
  return computations, entry


def _sizes(typ: str):
  """(dtype, element count) of each array in an HLO type (a tuple has several)."""
  for m in _ARRAY.finditer(typ):
    count = 1
    for dim in filter(None, m.group("dims").split(",")):
      count *= int(dim)
    yield m.group("dtype"), count


@dataclasses.dataclass(frozen=True)
class Summary:
  """What a cell's fast path does; compared as a whole against the expectation.

  Attributes:
    conditionals: fallback conditionals whose safe branch recomputes N
      elements (1 on every path through ``_kernel.reduced``).
    full_size_writes: "dtype output|temporary" per array of N elements written.
    row_size_writes: the same for arrays of the per-sample count M, when
      1 < M < N (empty otherwise).
    transcendentals: "place: ops" per fusion that holds transcendental ops,
      the place being "reduction", "output" or "temporary".
  """

  conditionals: int
  full_size_writes: tuple[str, ...] = ()
  row_size_writes: tuple[str, ...] = ()
  transcendentals: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Report:
  """A summary and the details behind it (for failure messages)."""

  summary: Summary
  writes: tuple[str, ...]
  fusions: tuple[str, ...]
  conditionals: tuple[str, ...]
  # "TYPE dimensions={..}" per fast-path reduce whose operand has N elements.
  reductions: tuple[str, ...]

  def __str__(self) -> str:
    lines = [str(self.summary), "writes:", *self.writes, "fusions with transcendentals:"]
    lines += [*self.fusions, "conditionals:", *self.conditionals, "reductions:"]
    return "\n  ".join([*lines, *self.reductions])


def inspect_hlo(text: str, rows: int = 1, n: int = N) -> Report:
  """Reads the fast path of an optimized HLO module.

  `rows` is the per-sample count M; `n` the elements of an input (full size).
  """
  computations, entry = parse_hlo(text)
  assert entry, "no ENTRY computation found in the HLO text"

  # The fallback: branch 0 of a conditional is the fast branch (lax.cond with a
  # bool predicate lowers to `case(int(pred))`, branch 1 being the true branch;
  # a pred-form conditional's true branch is the safe one).
  safe: set[str] = set()
  conditionals = []
  for comp, instructions in computations.items():
    for instr in instructions:
      if instr.op != "conditional":
        continue
      if "branch_computations" in instr.called:
        fast_branch, *safe_branches = instr.called["branch_computations"]
      else:
        fast_branch = instr.called["false_computation"][0]
        safe_branches = list(instr.called["true_computation"])
      safe.update(safe_branches)
      conditionals.append((comp, instr, fast_branch, safe_branches))

  def reachable(start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
      name = stack.pop()
      if name not in seen and name in computations:
        seen.add(name)
        stack += [c for i in computations[name] for names in i.called.values() for c in names]
    return seen

  def recomputes(branches) -> bool:
    comps = set().union(*(reachable(b) for b in branches))
    return any(k == n for c in comps for i in computations[c] for _, k in _sizes(i.type))

  # The fast path: everything reachable from the entry without entering a
  # safe branch. Fusion bodies and reducers inline into their caller.
  fast: set[str] = set()
  inlined: set[str] = set()
  stack = [(entry, False)]
  while stack:
    name, inline = stack.pop()
    if name in fast and (not inline or name in inlined):
      continue
    fast.add(name)
    if inline:
      inlined.add(name)
    for instr in computations[name]:
      for attr, names in instr.called.items():
        fused = (attr == "calls" and instr.op == "fusion") or (
          attr == "to_apply" and instr.op != "call"
        )
        stack += [(c, inline or fused) for c in names if c not in safe]
  materialized = fast - inlined

  # Writes the entry returns: follow aliases back from the entry's root,
  # through a conditional's fast branch to the operand it passes through.
  by_name = {i.name: i for c in materialized for i in computations[c]}
  branch_root, branch_operand = {}, {}
  for comp, instr, fast_branch, _ in conditionals:
    if comp in materialized:
      branch_root[instr.name] = next(i for i in computations[fast_branch] if i.root)
      for param in computations[fast_branch]:
        if param.op == "parameter":
          branch_operand[param.name] = by_name[instr.operands[1]]
  outputs: set[str] = set()
  stack = [next(i for i in computations[entry] if i.root)]
  while stack:
    instr = stack.pop()
    if instr.op == "conditional":
      stack.append(branch_root[instr.name])
    elif instr.name in branch_operand:
      stack.append(branch_operand[instr.name])
    elif instr.op in _NO_WRITE:
      stack += [by_name[o] for o in instr.operands if o in by_name]
    else:
      outputs.add(instr.name)

  counts = {n: "full", rows: "row"} if 1 < rows < n else {n: "full"}
  writes = {"full": [], "row": []}
  details = []
  for comp in sorted(materialized):
    for instr in computations[comp]:
      if instr.op in _NO_WRITE:
        continue
      for dtype, count in _sizes(instr.type):
        if count in counts:
          role = "output" if instr.name in outputs else "temporary"
          writes[counts[count]].append(f"{dtype} {role}")
          details.append(f"{comp}/{instr.name} = {instr.op} {instr.type} ({role})")

  def body_ops(name: str) -> collections.Counter:
    return collections.Counter(i.op for c in reachable(name) for i in computations[c])

  placements, fusions = [], []
  for comp in sorted(materialized):
    for instr in computations[comp]:
      if instr.op != "fusion":
        continue
      ops = body_ops(instr.called["calls"][0])
      found = sorted(op for op in ops.elements() if op in _TRANSCENDENTAL)
      if not found:
        continue
      if ops["reduce"]:
        place = "reduction"
      elif instr.name in outputs:
        place = "output"
      else:
        place = "temporary"
      placements.append(f"{place}: {' '.join(found)}")
      fusions.append(f"{comp}/{instr.name} {instr.type}: {place}: {' '.join(found)}")

  reductions = []
  for comp in sorted(fast):
    types = {i.name: i.type for i in computations[comp]}
    for instr in computations[comp]:
      operand = types.get(instr.operands[0], "") if instr.operands else ""
      if instr.op == "reduce" and any(k == n for _, k in _sizes(operand)):
        dims = re.search(r"dimensions=\{[\d,]*\}", instr.line)
        reductions.append(f"{operand.split('{')[0]} {dims.group(0) if dims else ''}")

  fallbacks = [c for c in conditionals if recomputes(c[3])]
  return Report(
    summary=Summary(
      conditionals=len(fallbacks),
      full_size_writes=tuple(sorted(writes["full"])),
      row_size_writes=tuple(sorted(writes["row"])),
      transcendentals=tuple(sorted(placements)),
    ),
    writes=tuple(details),
    fusions=tuple(fusions),
    conditionals=tuple(
      f"{comp}/{instr.name}: fast branch {fast_branch}, safe {safe_branches}"
      for comp, instr, fast_branch, safe_branches in conditionals
    ),
    reductions=tuple(sorted(reductions)),
  )


_COMPILED: dict[str, str] = {}


def inspect(fn, *args, rows: int = 1, n: int = N) -> Report:
  """Compiles `fn(*args)` with jit (args may be ShapeDtypeStructs) and inspects it.

  Programs that lower to the same StableHLO (``reduction="none"`` and
  ``binary_crossentropy``) are compiled once.
  """
  lowered = jax.jit(fn).lower(*args)
  key = lowered.as_text()
  if key not in _COMPILED:
    _COMPILED[key] = lowered.compile().as_text()
  return inspect_hlo(_COMPILED[key], rows, n)


# --------------------------------------------------------------------------
# The matrix.

SHAPES = {
  "flat": (N,),
  "column": (N, 1),
  "rows8": (N // 8, 8),
  "rows64": (N // 64, 64),
  "rows1024": (N // 1024, 1024),
  "rank3": (N // 512, 64, 8),
}
PATHS = ("default", "weighted", "masked", "none", "function", "metric", "probabilities")
DTYPES = ("float32", "bfloat16")
MODES = ("forward", "value_and_grad")
# The paths whose output is the per-sample losses (`[M]`) rather than a scalar.
_PER_SAMPLE = ("none", "function")
_LOGITS_LOSS = bce_jax.BinaryCrossentropy(from_logits=True)
_NONE_LOSS = bce_jax.BinaryCrossentropy(from_logits=True, reduction="none")
_PROBS_LOSS = bce_jax.BinaryCrossentropy()
_METRIC = bce_jax.BinaryCrossentropyMetric(from_logits=True)


def _per_sample_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  return shape[:-1]  # the default axis=-1


def _count(shape: tuple[int, ...]) -> int:
  out = 1
  for d in shape:
    out *= d
  return out


def _cell_fn(path: str, shape: tuple[int, ...], dtype: str):
  """`fn(logits, labels, *extra)` and its abstract arguments for one cell."""
  arrays = (jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)),) * 2
  per_sample = _per_sample_shape(shape)
  # `[B]` weights; a rank-1 input is one sample (Keras's rule): B = 1.
  batch = (per_sample[0],) if per_sample else (1,)
  if path == "weighted":
    weight = jax.ShapeDtypeStruct(batch, jnp.float32)
    return (lambda x, y, w: _LOGITS_LOSS(y, x, sample_weight=w)), (*arrays, weight)
  if path == "masked":
    mask = jax.ShapeDtypeStruct(per_sample if len(shape) == 3 else batch, jnp.bool_)
    return (lambda x, y, m: _LOGITS_LOSS(y, x, mask=m)), (*arrays, mask)
  fns = {
    "default": lambda x, y: _LOGITS_LOSS(y, x),
    "none": lambda x, y: _NONE_LOSS(y, x),
    "function": lambda x, y: bce_jax.binary_crossentropy(y, x, from_logits=True),
    "metric": lambda x, y: _METRIC.update(_METRIC.init(), y, x),
    "probabilities": lambda x, y: _PROBS_LOSS(y, x),
  }
  return fns[path], arrays


@functools.cache
def cell_report(path: str, shape_name: str, dtype: str, mode: str) -> Report:
  """The inspected fast path of one cell of the matrix, compiled once per process."""
  shape = SHAPES[shape_name]
  loss, args = _cell_fn(path, shape, dtype)
  fn = loss
  if mode == "value_and_grad":
    # W.r.t. the logits; the per-sample losses summed, the metric's total taken.
    fn = jax.value_and_grad(
      (lambda *a: loss(*a).total) if path == "metric" else (lambda *a: jnp.sum(loss(*a)))
    )
  return inspect(fn, *args, rows=_count(_per_sample_shape(shape)))


def ideal(path: str, shape_name: str, dtype: str, mode: str) -> Summary:
  """The fast path as designed: one fused pass, nothing written but what must be.

  A scalar loss writes nothing of N elements. Per-sample losses (`[M]`, the
  conditional's result) are written once: as the output, or for
  ``value_and_grad`` as the temporary the caller sums. The gradient, in the
  logits' dtype, is the only other write.
  """
  shape = SHAPES[shape_name]
  rows, width = _count(_per_sample_shape(shape)), shape[-1]
  per_sample = path in _PER_SAMPLE
  writes = {N: [], rows: []}
  if per_sample and rows > 1:
    writes[rows].append("f32 output" if mode == "forward" else "f32 temporary")
  if mode == "value_and_grad":
    writes[N].append(f"{_SHORT[dtype]} output")
  loss = "log log-plus-one" if path == "probabilities" else "exponential log-plus-one"
  # Per-sample losses of one element each are computed elementwise: no reduction.
  if per_sample and width == 1:
    place = "output" if mode == "forward" else "temporary"
  else:
    place = "reduction"
  transcendentals = [f"{place}: {loss}"]
  if mode == "value_and_grad" and path != "probabilities":
    transcendentals.append("output: exponential")  # the gradient's own sigmoid
  return Summary(
    conditionals=fallbacks(path),
    full_size_writes=tuple(sorted(writes[N])),
    row_size_writes=tuple(sorted(writes[rows])) if 1 < rows < N else (),
    transcendentals=tuple(sorted(transcendentals)),
  )


_SHORT = {"float32": "f32", "bfloat16": "bf16"}

# Measured baselines: the cells that miss the ideal, with jax/jaxlib 0.10.2 on
# CPU. Each row is (paths, shapes, dtypes, modes, the summary measured
# there); the first row that matches a cell applies. Regenerate the rows with
# `python -c "from tests import test_hlo; test_hlo.print_baselines()"`.
_BASELINES: list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...], Summary]]
_BASELINES = [
  # What the fast path still writes, measured 2026-11-29 (regenerate with
  # print_baselines). Row-size writes are arrays of M = N / L elements:
  # per-sample outputs are written by the fallback's `cond` and again when
  # divided by L; a mask's conversion to float is written for its count.
  # The masked [N, 1] column writes two full-size arrays: `losses * mask`
  # becomes a select, which XLA's CPU reduction fusion does not take, and
  # the mask's conversion for the count is another N floats.
  # ynn_fusion.1 = fusion f32[1024]{0}
  # wrapped_multiply = fusion f32[1024]{0}
  (
    ("weighted",),
    ("rows1024",),
    DTYPES,
    ("forward",),
    Summary(
      conditionals=1,
      full_size_writes=(),
      row_size_writes=("f32 temporary", "f32 temporary"),
      transcendentals=("reduction: exponential log-plus-one",),
    ),
  ),
  # ynn_fusion.1 = fusion f32[1024]{0}
  # wrapped_multiply = fusion f32[1024]{0}
  (
    ("weighted", "none", "function"),
    ("rows1024",),
    ("float32",),
    ("value_and_grad",),
    Summary(
      conditionals=1,
      full_size_writes=("f32 output",),
      row_size_writes=("f32 temporary", "f32 temporary"),
      transcendentals=("output: exponential", "reduction: exponential log-plus-one"),
    ),
  ),
  # ynn_fusion.1 = fusion f32[1024]{0}
  # wrapped_multiply = fusion f32[1024]{0}
  (
    ("weighted", "none", "function"),
    ("rows1024",),
    ("bfloat16",),
    ("value_and_grad",),
    Summary(
      conditionals=1,
      full_size_writes=("bf16 output",),
      row_size_writes=("f32 temporary", "f32 temporary"),
      transcendentals=("output: exponential", "reduction: exponential log-plus-one"),
    ),
  ),
  # wrapped_convert = fusion f32[1048576]{0}
  # broadcast_select_fusion = fusion f32[1048576]{0}
  (
    ("masked",),
    ("column",),
    DTYPES,
    ("forward",),
    Summary(
      conditionals=1,
      full_size_writes=("f32 temporary", "f32 temporary"),
      row_size_writes=(),
      transcendentals=("temporary: exponential log-plus-one",),
    ),
  ),
  # wrapped_convert = fusion f32[1048576]{0}
  # broadcast_select_fusion = fusion f32[1048576]{0}
  (
    ("masked",),
    ("column",),
    ("float32",),
    ("value_and_grad",),
    Summary(
      conditionals=1,
      full_size_writes=("f32 output", "f32 temporary", "f32 temporary"),
      row_size_writes=(),
      transcendentals=("output: exponential", "temporary: exponential log-plus-one"),
    ),
  ),
  # wrapped_convert = fusion f32[1048576]{0}
  # broadcast_select_fusion = fusion f32[1048576]{0}
  (
    ("masked",),
    ("column",),
    ("bfloat16",),
    ("value_and_grad",),
    Summary(
      conditionals=1,
      full_size_writes=("bf16 output", "f32 temporary", "f32 temporary"),
      row_size_writes=(),
      transcendentals=("output: exponential", "temporary: exponential log-plus-one"),
    ),
  ),
  # Weighted and masked bfloat16 rows of 8 reduce transposed inputs
  # (_fast_sums._weighted_columns): XLA writes them as two f32[8, M] copies,
  # which costs less than the blocks' narrow loop (NarrowRowsTest).
  # transpose_copy_fusion.3 = fusion f32[8,131072]{1,0}
  # transpose_copy_fusion.4 = fusion f32[8,131072]{1,0}
  (
    ("weighted",),
    ("rows8", "rank3"),
    ("bfloat16",),
    ("forward",),
    Summary(
      conditionals=1,
      full_size_writes=("f32 temporary", "f32 temporary"),
      row_size_writes=(),
      transcendentals=("reduction: exponential log-plus-one",),
    ),
  ),
  (
    ("weighted",),
    ("rows8", "rank3"),
    ("bfloat16",),
    ("value_and_grad",),
    Summary(
      conditionals=1,
      full_size_writes=("bf16 output", "f32 temporary", "f32 temporary"),
      row_size_writes=(),
      transcendentals=("output: exponential", "reduction: exponential log-plus-one"),
    ),
  ),
  (
    ("masked",),
    ("rows8", "rank3"),
    ("bfloat16",),
    ("forward",),
    Summary(
      conditionals=1,
      full_size_writes=("f32 temporary", "f32 temporary"),
      row_size_writes=("f32 temporary",),
      transcendentals=("reduction: exponential log-plus-one",),
    ),
  ),
  (
    ("masked",),
    ("rows8", "rank3"),
    ("bfloat16",),
    ("value_and_grad",),
    Summary(
      conditionals=1,
      full_size_writes=("bf16 output", "f32 temporary", "f32 temporary"),
      row_size_writes=("f32 temporary",),
      transcendentals=("output: exponential", "reduction: exponential log-plus-one"),
    ),
  ),
  # wrapped_convert = fusion f32[131072]{0}
  (
    ("masked",),
    ("rows8", "rows64", "rank3"),
    DTYPES,
    ("forward",),
    Summary(
      conditionals=1,
      full_size_writes=(),
      row_size_writes=("f32 temporary",),
      transcendentals=("reduction: exponential log-plus-one",),
    ),
  ),
  # wrapped_convert = fusion f32[131072]{0}
  (
    ("masked",),
    ("rows8", "rows64", "rank3"),
    ("float32",),
    ("value_and_grad",),
    Summary(
      conditionals=1,
      full_size_writes=("f32 output",),
      row_size_writes=("f32 temporary",),
      transcendentals=("output: exponential", "reduction: exponential log-plus-one"),
    ),
  ),
  # wrapped_convert = fusion f32[131072]{0}
  (
    ("masked",),
    ("rows8", "rows64", "rank3"),
    ("bfloat16",),
    ("value_and_grad",),
    Summary(
      conditionals=1,
      full_size_writes=("bf16 output",),
      row_size_writes=("f32 temporary",),
      transcendentals=("output: exponential", "reduction: exponential log-plus-one"),
    ),
  ),
  # wrapped_convert = fusion f32[1024]{0}
  # ynn_fusion.1 = fusion f32[1024]{0}
  # convert_multiply_fusion = fusion f32[1024]{0}
  (
    ("masked",),
    ("rows1024",),
    DTYPES,
    ("forward",),
    Summary(
      conditionals=1,
      full_size_writes=(),
      row_size_writes=("f32 temporary", "f32 temporary", "f32 temporary"),
      transcendentals=("reduction: exponential log-plus-one",),
    ),
  ),
  # wrapped_convert = fusion f32[1024]{0}
  # ynn_fusion.1 = fusion f32[1024]{0}
  # convert_multiply_fusion = fusion f32[1024]{0}
  (
    ("masked",),
    ("rows1024",),
    ("float32",),
    ("value_and_grad",),
    Summary(
      conditionals=1,
      full_size_writes=("f32 output",),
      row_size_writes=("f32 temporary", "f32 temporary", "f32 temporary"),
      transcendentals=("output: exponential", "reduction: exponential log-plus-one"),
    ),
  ),
  # wrapped_convert = fusion f32[1024]{0}
  # ynn_fusion.1 = fusion f32[1024]{0}
  # convert_multiply_fusion = fusion f32[1024]{0}
  (
    ("masked",),
    ("rows1024",),
    ("bfloat16",),
    ("value_and_grad",),
    Summary(
      conditionals=1,
      full_size_writes=("bf16 output",),
      row_size_writes=("f32 temporary", "f32 temporary", "f32 temporary"),
      transcendentals=("output: exponential", "reduction: exponential log-plus-one"),
    ),
  ),
  # Per-sample losses of rows of 1024: the row sums, then their means.
  (
    ("none", "function"),
    ("rows1024",),
    DTYPES,
    ("forward",),
    Summary(
      conditionals=1,
      full_size_writes=(),
      row_size_writes=("f32 output", "f32 temporary"),
      transcendentals=("reduction: exponential log-plus-one",),
    ),
  ),
]


def fallbacks(path: str) -> int:
  """Conditionals with a safe branch over N elements on a path.

  Every path has the kernel's (nan from infinite logits or padding); a scalar
  loss has a second, taken when its float32 total overflows (losses near the
  float32 maximum) to sum terms divided first.
  """
  return 2 if path in ("default", "weighted", "masked", "probabilities") else 1


def expected(path: str, shape_name: str, dtype: str, mode: str) -> Summary:
  """The measured baseline of the first matching row of `_BASELINES`, else the ideal."""
  for paths, shapes, dtypes, modes, summary in _BASELINES:
    if path in paths and shape_name in shapes and dtype in dtypes and mode in modes:
      return dataclasses.replace(summary, conditionals=fallbacks(path))
  return ideal(path, shape_name, dtype, mode)


_CELLS = [
  {"testcase_name": f"_{p}_{s}_{d}_{m}", "path": p, "shape_name": s, "dtype": d, "mode": m}
  for p in PATHS
  for s in SHAPES
  for d in DTYPES
  for m in MODES
]


@absltest.skipUnless(_APPLIES, _SKIP_REASON)
class FastPathTest(parameterized.TestCase):
  """One test per cell of the matrix; each compiles once (the reports are cached)."""

  @parameterized.named_parameters(_CELLS)
  def test_cell(self, path, shape_name, dtype, mode):
    report = cell_report(path, shape_name, dtype, mode)
    want = expected(path, shape_name, dtype, mode)
    note = "" if want == ideal(path, shape_name, dtype, mode) else " (a measured baseline)"
    self.assertEqual(report.summary, want, msg=f"want{note}; the HLO's fast path:\n{report}")

  @parameterized.product(path=PATHS, dtype=DTYPES, mode=MODES)
  def test_column_input_is_reduced_flat(self, path, dtype, mode):
    # XLA's CPU reduction of an [N, 1] array runs ~30x slower than of [N]:
    # every reduction of N elements on the fast path reads a flat vector.
    report = cell_report(path, "column", dtype, mode)
    for reduction in report.reductions:
      self.assertRegex(reduction, rf"^f32\[{N}\] ", msg=f"\n{report}")


# Narrow rows of the widths the matrix leaves out (it has rows of 8). A
# weighted or masked total reduces the transposed inputs (`[L, M]`, which XLA
# writes as two float32 copies) below `_fast_sums._columns_below` elements a row,
# and `[M/k, k, L]` blocks of rows from there, which write nothing.
NARROW_WIDTHS = (2, 3, 5, 12, 16)


def _columns(width: int, dtype: str) -> bool:
  return width < (8 if dtype == "float32" else 16)


@functools.cache
def narrow_report(path: str, width: int, dtype: str, mode: str) -> Report:
  """The inspected fast path of a weighted or masked `[M, width]` total."""
  rows = N // width
  loss, args = _cell_fn(path, (rows, width), dtype)
  fn = loss if mode == "forward" else jax.value_and_grad(loss)
  return inspect(fn, *args, rows=rows, n=rows * width)


@absltest.skipUnless(_APPLIES, _SKIP_REASON)
class NarrowRowsTest(parameterized.TestCase):
  @parameterized.product(width=NARROW_WIDTHS, dtype=DTYPES, path=("weighted", "masked"), mode=MODES)
  def test_layout(self, width, dtype, path, mode):
    report = narrow_report(path, width, dtype, mode)
    rows = N // width
    writes = [f"{_SHORT[dtype]} output"] if mode == "value_and_grad" else []
    if _columns(width, dtype):
      writes += ["f32 temporary"] * 2
      reduced = rf"f32\[{width},{rows}\] dimensions=\{{0,1\}}"
    else:
      group = max(d for d in range(1, 128 // width + 1) if rows % d == 0)
      reduced = rf"f32\[{rows // group},{group},{width}\] dimensions=\{{0,1,2\}}"
    want = ideal(path, "rows8", dtype, mode)
    self.assertEqual(report.summary.conditionals, want.conditionals, msg=f"\n{report}")
    self.assertEqual(report.summary.full_size_writes, tuple(sorted(writes)), msg=f"\n{report}")
    self.assertEqual(report.summary.transcendentals, want.transcendentals, msg=f"\n{report}")
    # One reduction of the inputs' size on the fast path: the value's.
    self.assertLen(report.reductions, 1, msg=f"\n{report}")
    self.assertRegex(report.reductions[0], f"^{reduced}$", msg=f"\n{report}")


def print_baselines() -> None:
  """Prints `_BASELINES` rows for the cells that miss the ideal today.

  Cells with the same summary are grouped into products of the matrix's
  axes; each row's comment names one cell's temporaries.
  """
  axes = (PATHS, tuple(SHAPES), DTYPES, MODES)
  groups: dict[Summary, set[tuple[str, ...]]] = collections.defaultdict(set)
  for cell in itertools.product(*axes):
    summary = cell_report(*cell).summary
    if summary != ideal(*cell):
      groups[summary].add(cell)
  rows = []
  for summary, cells in groups.items():
    left = set(cells)
    while left:
      box = [[v] for v in min(left, key=lambda c: [a.index(v) for a, v in zip(axes, c)])]
      grown = True
      while grown:
        grown = False
        for i, axis in enumerate(axes):
          for value in axis:
            trial = [b + [value] if j == i else b for j, b in enumerate(box)]
            if value not in box[i] and set(itertools.product(*trial)) <= cells:
              box, grown = trial, True
      left -= set(itertools.product(*box))
      rows.append(([sorted(b, key=a.index) for a, b in zip(axes, box)], summary))
  rows.sort(key=lambda r: [a.index(b[0]) for a, b in zip(axes, r[0])])
  for box, summary in rows:
    report = cell_report(*(b[0] for b in box))
    for write in report.writes:
      if write.endswith("(temporary)"):
        print(f"  # {write.split('/', 1)[1].removesuffix(' (temporary)')}")
    names = (
      "DTYPES" if tuple(b) == DTYPES else "MODES" if tuple(b) == MODES else repr(tuple(b))
      for b in box
    )
    print(f"  ({', '.join(names)}, {summary!r}),")


_PRED_FORM = """
HloModule m

%fast (p: (f32[])) -> (f32[]) {
  ROOT %p = (f32[]) parameter(0)
}

%safe_body (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %e = f32[8]{0} exponential(%a)
}

%safe (q: (f32[8])) -> (f32[]) {
  %q = (f32[8]{0}) parameter(0)
  %g = f32[8]{0} get-tuple-element(%q), index=0
  %f = f32[8]{0} fusion(%g), kind=kLoop, calls=%safe_body
  %z = f32[] constant(0)
  ROOT %t = (f32[]) tuple(%z)
}

%sum_body (x: f32[8]) -> f32[] {
  %x = f32[8]{0} parameter(0)
  %l = f32[8]{0} log(%x)
  %c = f32[] constant(0)
  ROOT %r = f32[] reduce(%l, %c), dimensions={0}, to_apply=%add
}

%add (u: f32[], v: f32[]) -> f32[] {
  %u = f32[] parameter(0)
  %v = f32[] parameter(1)
  ROOT %w = f32[] add(%u, %v)
}

ENTRY %main (x: f32[8]) -> (f32[], f32[8]) {
  %x = f32[8]{0} parameter(0)
  %n = f32[8]{0} negate(%x)
  %s = f32[] fusion(%x), kind=kLoop, calls=%sum_body
  %bad = pred[] compare(%s, %s), direction=NE
  %ft = (f32[]) tuple(%s)
  %st = (f32[8]{0}) tuple(%x)
  %c = (f32[]) conditional(%bad, %st, %ft), true_computation=%safe, false_computation=%fast
  %v = f32[] get-tuple-element(%c), index=0
  ROOT %out = (f32[], f32[8]{0}) tuple(%v, %n)
}
"""


class InspectorTest(absltest.TestCase):
  """The inspector itself, on HLO text (no compilation)."""

  def test_pred_form_conditional_and_aliases(self):
    # `conditional(pred, true_operand, false_operand)`: the false branch is fast.
    report = inspect_hlo(_PRED_FORM.replace("[8]", f"[{N}]"))
    self.assertEqual(
      report.summary,
      Summary(
        conditionals=1,
        full_size_writes=("f32 output",),  # %n; %x is a parameter, the safe branch is left out
        transcendentals=("reduction: log",),  # the safe branch's exponential is left out
      ),
      msg=f"\n{report}",
    )

  def test_pred_form_operands_in_order(self):
    text = _PRED_FORM.replace("[8]", f"[{N}]")
    computations, entry = parse_hlo(text)
    self.assertEqual(entry, "main")
    cond = next(i for i in computations["main"] if i.op == "conditional")
    self.assertEqual(cond.operands, ("bad", "st", "ft"))
    self.assertEqual(cond.called, {"true_computation": ("safe",), "false_computation": ("fast",)})


# --------------------------------------------------------------------------
# Negative controls: formulations the inspector must flag.


def _plain_loss(x, y):
  # The same formula differentiated by JAX: exp(-|x|) is shared by the loss
  # and the gradient, so XLA writes it out.
  losses = jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
  return losses.mean()


def _flagged(report: Report, mode: str) -> list[str]:
  """How `report` misses the ideal scalar loss (conditionals aside; [] if it does not)."""
  want = ideal("default", "flat", "float32", mode)
  got = report.summary
  return [
    f"{field}: {getattr(got, field)} != {getattr(want, field)}"
    for field in ("full_size_writes", "transcendentals")
    if getattr(got, field) != getattr(want, field)
  ]


@absltest.skipUnless(_APPLIES, _SKIP_REASON)
class NegativeControlTest(absltest.TestCase):
  def test_inspector_flags_plain_autodiff(self):
    args = (jax.ShapeDtypeStruct((N,), jnp.float32),) * 2
    report = inspect(jax.value_and_grad(_plain_loss), *args)
    self.assertNotEqual(_flagged(report, "value_and_grad"), [], msg=f"\n{report}")
    self.assertIn("f32 temporary", report.summary.full_size_writes, msg=f"\n{report}")

  def test_inspector_flags_optax(self):
    try:
      import optax
    except ImportError:
      self.skipTest("optax is not installed")
    args = (jax.ShapeDtypeStruct((N,), jnp.float32),) * 2

    def loss(x, y):
      return optax.sigmoid_binary_cross_entropy(x, y).mean()

    # optax pays 2 exp + 2 log1p forward and writes temporaries with the gradient.
    forward = inspect(loss, *args)
    grad = inspect(jax.value_and_grad(loss), *args)
    for report, mode in ((forward, "forward"), (grad, "value_and_grad")):
      self.assertNotEqual(_flagged(report, mode), [], msg=f"\n{report}")
      self.assertIn("f32 temporary", report.summary.full_size_writes, msg=f"\n{report}")


if __name__ == "__main__":
  absltest.main()

"""Measuring: wall-clock medians, the machine's matmul peak, FLOPs counted from a jaxpr, and a
description of the machine and the library versions.

FLOPs come from an analytic count over the jaxpr, after dead-code elimination (2 x
multiply-adds of every convolution and matrix product, loops multiplied by their trip counts),
not from XLA's cost analysis: that one counts a loop body once, so it misses 9 of the 10 PGD
steps.
"""

import collections
import glob
import gzip
import json
import os
import platform
import re
import statistics
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(run, runs: int, warmup: int = 1) -> tuple[float, list[float]]:
  """Median wall time of `run()` (which must block until its work is done) after warm-up."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


# --- FLOPs from a jaxpr ---------------------------------------------------------------------------

def _conv_flops(eqn):
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
  window = int(np.prod([rhs.shape[d] for d in rhs_spec[2:]]))
  del lhs
  return 2 * int(np.prod(out.shape)) * window * rhs.shape[rhs_spec[1]]


def _dot_flops(eqn):
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  contracted = int(np.prod([lhs.shape[d] for d in lhs_contract]))
  return 2 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> int:
  """2 x multiply-adds of convolutions and dot products; scans count `length` times, conds their
  costliest branch. A while loop (unknown trip count) counts once."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def count_flops(fn, *args) -> int:
  """jaxpr_flops of fn(*args) once the work no output needs is removed, as XLA removes it."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  try:
    from jax._src.interpreters import partial_eval  # pylint: disable=g-import-not-at-top
    jaxpr, _ = partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  except (ImportError, AttributeError):  # a private API: without it, dead work is counted too
    pass
  return jaxpr_flops(jaxpr)


# --- the machine ----------------------------------------------------------------------------------

def matmul_peak_jax(dtype=jnp.float32, size=None, runs=10) -> float:
  """FLOP/s of a large square matmul under XLA at JAX's default precision (on recent NVIDIA
  GPUs that lets float32 run as TF32, as the convolutions of the train step do): the practical
  peak of the device. The size is 2048 on CPU and 8192 on accelerators, where a smaller product
  is too short to fill the chip and measures launch overhead."""
  if size is None:
    size = 2048 if jax.devices()[0].platform == "cpu" else 8192
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), dtype)
  b = jax.random.normal(key_b, (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  seconds, _ = median_seconds(lambda: matmul(a, b).block_until_ready(), runs, warmup=2)
  return 2 * size**3 / seconds


def machine_description() -> str:
  device = jax.devices()[0]
  if device.platform != "cpu":
    return f"{jax.device_count()} x {device.device_kind} ({device.platform})"
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"CPU: {model}, {os.cpu_count()} cores visible"


def versions() -> dict:
  found = {"python": platform.python_version()}
  for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
    try:
      found[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return found


# --- profiles -------------------------------------------------------------------------------------

def _op_names(hlo_text):
  """HLO instruction name -> the jax op that made it: its op_name metadata or, for a fusion
  without one, that of the root of the computation it calls."""
  lines = re.findall(r"^\s*(ROOT )?%([\w.\-]+) = ([^\n]*)$", hlo_text, re.MULTILINE)
  roots = {}
  for computation, body in re.findall(r"^(?:ENTRY )?%([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo_text,
                                      re.MULTILINE | re.DOTALL):
    root = re.search(r"ROOT [^\n]*op_name=\"([^\"]*)\"", body)
    roots[computation] = root.group(1) if root else ""
  found = {}
  for _, name, rest in lines:
    op_name = re.search(r'op_name="([^"]*)"', rest)
    calls = re.search(r"calls=%([\w.\-]+)", rest)
    found[name] = op_name.group(1) if op_name else roots.get(calls.group(1), "") if calls else ""
  return found


def profile_ops(run, hlo_text, directory, top=20):
  """Runs `run()` once under jax.profiler; returns the `top` XLA operations by total time as
  (milliseconds, calls, instruction, op_name), and the time per kind of operation (op_kinds)."""
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    run()
  paths = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    events = json.load(f)["traceEvents"]
  names = _op_names(hlo_text)
  total_us, calls = collections.Counter(), collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in names:
      total_us[event["name"]] += event["dur"]
      calls[event["name"]] += 1
  all_ops = [(name, us / 1e3) for name, us in total_us.items()]
  rows = [(us / 1e3, calls[name], name, names[name]) for name, us in total_us.most_common(top)]
  return rows, op_kinds(all_ops)


def op_kinds(op_times):
  """Time per kind of XLA operation (the instruction name without its '.N' suffix:
  'ynn_fusion', 'conv_general_dilated', 'dot_general', ...), most costly first, in ms."""
  kinds = collections.Counter()
  for name, ms in op_times:
    kinds[re.sub(r"\.\d+$", "", name)] += ms
  return kinds.most_common()

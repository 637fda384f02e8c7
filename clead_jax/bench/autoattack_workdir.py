"""AutoAttack (standard) on a trained workdir's model, ours against the reference, side by side.

  python -m clead_jax.bench autoattack --workdir runs/digits --num_examples 360 --compare reference

Ours is the evaluation's Runner (stage by stage on the points still robust, exactly what
`python -m clead_jax.evaluate --attacks=autoattack` runs, without the persistent compilation
cache, so that compilation is included); the reference is pyautoattack's AutoAttack on the
exported PyTorch model, as `crosscheck` runs it; same weights, same first N test points.

Per stage: seconds (ours: compilation apart, from JAX's compile events), forward and backward
passes counted (images through the network; ours in a second, untimed run of the same
deterministic Runner with a counting network, the reference in its timed run through hooks on
the module), the achieved FLOP/s of those passes against the matmul peak measured in this run,
and the robust accuracy after it.
"""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from clead_jax import input_pipeline
from clead_jax import parallel
from clead_jax import train_state
from clead_jax.bench import measure

# JAX's monitoring events of a compilation: tracing, lowering and XLA's compilation.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class _Events:
  """(end time, seconds) of every compilation event while listening."""

  def __init__(self):
    self.events, self.listening = [], False
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event, duration, **_):
    if self.listening and event in _COMPILE_EVENTS:
      self.events.append((time.time(), duration))

  def between(self, start, end):
    return sum(d for t, d in self.events if start <= t < end)


class PassCounter:
  """Images through the network, forward and backward, with the time each was counted."""

  def __init__(self):
    self.lock = threading.Lock()
    self.log = []  # (time, 'forward' or 'backward', images)

  def add(self, kind, images):
    with self.lock:
      self.log.append((time.time(), kind, int(images)))

  def between(self, start, end):
    counts = {"forward": 0, "backward": 0}
    for t, kind, images in self.log:
      if start <= t < end:
        counts[kind] += images
    return counts


def counting_apply(apply_fn, counter):
  """apply_fn(variables, x) -> (logits, embedding) that also counts its passes on the host: a
  forward per call, a backward per input gradient taken through it (padding rows included: they
  are computed)."""
  @jax.custom_vjp
  def counted(variables, x):
    jax.debug.callback(lambda: counter.add("forward", x.shape[0]))
    return apply_fn(variables, x)

  def forward(variables, x):
    jax.debug.callback(lambda: counter.add("forward", x.shape[0]))
    out, vjp = jax.vjp(apply_fn, variables, x)
    return out, vjp

  def backward(vjp, cotangents):
    grads = vjp(cotangents)
    jax.debug.callback(lambda: counter.add("backward", grads[1].shape[0]))
    return grads

  counted.defvjp(forward, backward)
  return counted


def _flops_per_image(apply_fn, variables, x):
  """(forward, backward) FLOPs per image of the network, the backward being the input gradient
  alone (what the attacks take), counted from the jaxpr."""
  forward = measure.count_flops(lambda v, x: apply_fn(v, x)[0], variables, x)
  grad = jax.grad(lambda x: jnp.sum(apply_fn(variables, x)[0]))
  both = measure.count_flops(grad, x)
  return forward / x.shape[0], (both - forward) / x.shape[0]


def _spans(durations, end):
  """(start, end) wall times of consecutive stages of `durations` seconds that ended at `end`."""
  at = end - sum(durations)
  for seconds in durations:
    yield at, at + seconds
    at += seconds


def _add_rates(stages, flops, peak):
  """Achieved FLOP/s of each stage's counted passes over its seconds without compilation."""
  for row in stages.values():
    run_s = row["time_s"] - row.get("compile_s", 0.0)
    done = row.get("forward", 0) * flops[0] + row.get("backward", 0) * flops[1]
    row["achieved_flops"] = done / run_s if run_s > 0 else float("nan")
    row["share_of_peak"] = row["achieved_flops"] / peak


def run_ours(network, variables, images, labels, *, epsilon, norm, batch_size, seed, mesh):
  """Our Runner, timed (compilation apart), then counted; returns the result dict."""
  from clead_jax.evaluation import autoattack_runner  # pylint: disable=g-import-not-at-top
  from clead_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
  evaluator = suite.Evaluator(network, mesh, norm, batch_size, seed)
  events = _Events()
  runner = autoattack_runner.Runner(evaluator.apply, mesh, norm, batch_size, seed)
  events.listening = True
  start = time.time()
  result = runner.run(variables, images, labels, epsilon)
  total = time.time() - start
  events.listening = False
  # The stages end with the run; the time before the first stage is the clean pass.
  spans = list(_spans(result.stage_times_s, start + total))
  first = spans[0][0]
  stages = {name: {"accuracy_after": float(np.mean(flags)), "time_s": seconds,
                   "compile_s": events.between(*span)}
            for name, flags, seconds, span in zip(result.stage_names, result.robust_after,
                                                  result.stage_times_s, spans)}
  counter = PassCounter()
  counting = autoattack_runner.Runner(counting_apply(evaluator.apply, counter), mesh, norm,
                                      batch_size, seed)
  count_start = time.time()
  counted = counting.run(variables, images, labels, epsilon)
  if not np.array_equal(counted.robust_after, result.robust_after):
    raise RuntimeError("the counting run's flags differ from the timed run's: the Runner is not "
                       "deterministic here, so its counts would not be the timed run's")
  for row, span in zip(stages.values(),
                       _spans(counted.stage_times_s, count_start + counted.time_s)):
    row.update(counter.between(*span))
  return {"time_s": total, "compile_s": events.between(start, start + total),
          "clean_pass_s": first - start, "clean_compile_s": events.between(start, first),
          "robust_accuracy": float(result.robust_after[-1].mean()),
          "clean_accuracy": float(result.clean.mean()), "stages": stages,
          "robust": result.robust_after[-1]}


def run_reference(module, images, labels, *, epsilon, norm, batch_size, seed, device="cpu"):
  """The reference AutoAttack with its passes counted through hooks on the module."""
  import torch  # pylint: disable=g-import-not-at-top
  from clead_jax import crosscheck  # pylint: disable=g-import-not-at-top
  counter = PassCounter()

  class Counted(torch.nn.Module):
    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def forward(self, x):
      counter.add("forward", x.shape[0])
      return self.inner(x)

  counted = Counted(module)
  counted.register_full_backward_hook(
      lambda _, grad_input, grad_output: counter.add("backward", grad_output[0].shape[0]))
  times = {}
  start = time.time()
  robust, after, seconds = crosscheck.reference_autoattack(
      counted, images, labels, epsilon=epsilon, norm=norm, batch_size=batch_size,
      seed=seed, device=device, stage_times=times)
  stage_seconds = [times.get(name, 0.0) for name in after]
  stages = {crosscheck.STAGES[name]: {"accuracy_after": after[name], "time_s": stage_s,
                                      **counter.between(*span)}
            for name, stage_s, span in zip(after, stage_seconds,
                                           _spans(stage_seconds, start + seconds))}
  return {"time_s": seconds, "robust_accuracy": float(robust.mean()), "stages": stages,
          "robust": robust, "torch_threads": torch.get_num_threads()}


def compare(workdir, num_examples, *, reference=True, batch_size=None, torch_device="cpu"):
  """The side-by-side result of ours and (with `reference`) the reference on `workdir`'s
  evaluated weights and its first `num_examples` test points."""
  from clead_jax import torch_weights  # pylint: disable=g-import-not-at-top
  from clead_jax.evaluation import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = workdir_lib.load_config(workdir)
  mesh = parallel.make_mesh()
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  state, step, _ = workdir_lib.restore_checkpoint(workdir, config, model, mesh)
  variables = jax.device_get(workdir_lib.evaluated_variables(state, config))
  n = workdir_lib.num_test_examples(num_examples, dataset, "--num_examples")
  images, labels = dataset.test_images[:n], dataset.test_labels[:n]
  batch_size = batch_size or config.eval.batch_size
  epsilon, norm = float(config.attack.epsilon), config.attack.norm
  peak = measure.matmul_peak_jax()
  apply_fn = lambda v, x: model.network.apply(v, x, train=False)
  sample = jnp.asarray(input_pipeline.to_float(images[:min(n, 64)]))
  flops = _flops_per_image(apply_fn, variables, sample)
  ours = run_ours(model.network, variables, images, labels, epsilon=epsilon, norm=norm,
                  batch_size=batch_size, seed=config.seed, mesh=mesh)
  _add_rates(ours["stages"], flops, peak)
  result = {"workload": f"autoattack {config.data.name} {config.model.name} "
                        f"w{config.model.width} n{n}",
            "workdir_step": int(step), "num_examples": n, "epsilon": epsilon, "norm": norm,
            "batch_size": batch_size, "forward_flops_per_image": flops[0],
            "backward_flops_per_image": flops[1], "peak_flops": peak, "ours": ours}
  if reference:
    arch = torch_weights.architecture(config.model, dataset.image_shape, dataset.num_classes)
    module = torch_weights.torch_module(arch, dataset.mean, dataset.std,
                                        torch_weights.to_torch(config.model, variables)[0])
    ref = run_reference(module, input_pipeline.to_float(images), labels, epsilon=epsilon,
                        norm=norm, batch_size=batch_size, seed=config.seed, device=torch_device)
    _add_rates(ref["stages"], flops, peak)
    result["reference"] = ref
    result["ratio"] = ref["time_s"] / ours["time_s"]
    result["robust_examples"] = {"ours": int(ours["robust"].sum()),
                                 "reference": int(ref["robust"].sum())}
  for side in ("ours", "reference"):
    if side in result:
      result[side]["robust"] = np.flatnonzero(result[side]["robust"]).tolist()
  result["device"] = measure.machine_description()
  result["versions"] = measure.versions()
  return result


def markdown(result) -> str:
  """The side-by-side table of one result."""
  ours, ref = result["ours"], result.get("reference")
  lines = [f"{result['workload']}, {result['num_examples']} points, {result['norm']} epsilon "
           f"{result['epsilon']:g}, batch {result['batch_size']}; {result['device']}; matmul peak "
           f"{result['peak_flops'] / 1e9:.0f} GFLOP/s; network {result['forward_flops_per_image'] / 1e6:.2f} "
           f"MFLOP forward, {result['backward_flops_per_image'] / 1e6:.2f} MFLOP input gradient "
           "per image", "",
           "| stage | ours s (compile s) | reference s | ratio | ours fwd / bwd passes | "
           "reference fwd / bwd passes | ours share of peak | reference share of peak | "
           "robust after, ours / reference |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, row in ours["stages"].items():
    other = (ref or {}).get("stages", {}).get(name, {})
    ratio = (f"{other['time_s'] / row['time_s']:.2f}x" if other.get("time_s") else "-")
    lines.append(
        f"| {name} | {row['time_s']:.1f} ({row['compile_s']:.1f}) | "
        f"{other.get('time_s', float('nan')):.1f} | {ratio} | "
        f"{row['forward']:,} / {row['backward']:,} | "
        f"{other.get('forward', 0):,} / {other.get('backward', 0):,} | "
        f"{row['share_of_peak']:.1%} | {other.get('share_of_peak', float('nan')):.1%} | "
        f"{row['accuracy_after']:.4f} / {other.get('accuracy_after', float('nan')):.4f} |")
  total = (f"| end to end (clean pass included) | {ours['time_s']:.1f} ({ours['compile_s']:.1f}) | "
           f"{ref['time_s']:.1f} | **{result['ratio']:.2f}x** | | | | | "
           f"{result['robust_examples']['ours']} / {result['robust_examples']['reference']} "
           "examples |" if ref else
           f"| end to end | {ours['time_s']:.1f} ({ours['compile_s']:.1f}) | | | | | | | |")
  lines.append(total)
  return "\n".join(lines)

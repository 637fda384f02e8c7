"""The benchmark command.

  python -m clead_jax.bench train_step --model resnet18 --width 64 --batch 128 --pgd-steps 10 \
      [--dtype float32|bfloat16] [--compare torch] [--json OUT]
  python -m clead_jax.bench attacks --model resnet18 --width 64 --batch 128 \
      [--attacks pgd20,autoattack] [--compare torch] [--json OUT]
  python -m clead_jax.bench table OUT.json...      (the markdown table of saved results)

Each workload is compiled once (its compile time reported on its own), warmed up, then timed
`--runs` times; the median is reported. With --rounds R the JAX and PyTorch timings alternate R
times in this one process, so that load from other processes hits both alike; the ratio is
JAX images/s over PyTorch images/s from the medians over all rounds.
"""

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

from clead_jax import parallel
from clead_jax.bench import autoattack_workdir
from clead_jax.bench import measure
from clead_jax.bench import workloads
from clead_jax.errors import UserError
from clead_jax.evaluation import suite

JSON_KEYS = ("jax_images_per_s", "torch_images_per_s", "ratio", "jax_compile_s",
             "flops_per_image", "achieved_flops", "peak_flops", "device", "versions")
FLOPS_METHOD = ("analytic: 2 x multiply-adds of every convolution and dot_general in the jaxpr, "
                "loops times their trip counts")
# attack name -> (steps, step divisor) of the PyTorch reference, as attacks.EVAL_ATTACKS defines
# them; AutoAttack has no PyTorch reference here.
TORCH_ATTACKS = {"pgd20": (20, 4)}


def _parser():
  parser = argparse.ArgumentParser(prog="python -m clead_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  for name, help_text in (("train_step", "the jitted C-LEAD train step"),
                          ("attacks", "the evaluation attacks (PGD-20, AutoAttack)")):
    sub = commands.add_parser(name, help=help_text)
    sub.add_argument("--model", default="resnet18",
                     help="config.model.name: resnet18, preact_resnet18, wide_resnet")
    sub.add_argument("--width", type=int, default=64, help="config.model.width (resnets)")
    sub.add_argument("--depth", type=int, default=34, help="config.model.depth (wide_resnet)")
    sub.add_argument("--widen", type=int, default=10, help="config.model.widen (wide_resnet)")
    sub.add_argument("--batch", type=int, default=128, help="images per step or attack call")
    sub.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                     help="config.model.dtype (compute; params stay float32)")
    sub.add_argument("--compare", default=None,
                     help="also time PyTorch references in this process: torch (eager, "
                          "channels_last, autocast for bf16, cuDNN benchmark), torch_compile "
                          "(the same under torch.compile), or both, comma-separated")
    sub.add_argument("--torch-device", default="cpu", help="device of the PyTorch reference")
    sub.add_argument("--runs", type=int, default=5, help="timed runs after warm-up (median)")
    sub.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    sub.add_argument("--rounds", type=int, default=1,
                     help="alternate JAX and PyTorch timings this many times")
    sub.add_argument("--config", default=workloads.DEFAULT_CONFIG,
                     help="config file whose get_config() the overrides apply to")
    sub.add_argument("--json", default=None, help="write the results to this file")
    sub.add_argument("--conv", choices=("custom", "autodiff"), default="custom",
                     help="autodiff: convolution gradients as before the CPU rules (baseline)")
    sub.add_argument("--profile", default=None, metavar="DIR",
                     help="profile one more JAX run into DIR and print its costliest operations")
    if name == "train_step":
      sub.add_argument("--pgd-steps", type=int, default=10, help="config.attack.steps")
      sub.add_argument("--pgd-unroll", type=int, default=1,
                       help="config.attack.unroll: 1 = one compiled PGD loop body, "
                            "--pgd-steps = fully unrolled")
    else:
      sub.add_argument("--attacks", default="pgd20,autoattack",
                       help="comma-separated white-box evaluation attacks (evaluation/suite.py)")
  compare = commands.add_parser(
      "autoattack", help="AutoAttack standard, ours against the reference (pyautoattack)")
  compare.add_argument("--model", default="resnet18")
  compare.add_argument("--width", type=int, default=64)
  compare.add_argument("--depth", type=int, default=34)
  compare.add_argument("--widen", type=int, default=10)
  compare.add_argument("--num_examples", type=int, default=256)
  compare.add_argument("--batch", type=int, default=None,
                       help="batch size of both (default 256; with --workdir its "
                            "config.eval.batch_size)")
  compare.add_argument("--epsilon", type=float, default=1 / 255,
                       help="L-inf epsilon (small: a random model must keep some points)")
  compare.add_argument("--compare", choices=("reference",), default=None)
  compare.add_argument("--workdir", default=None,
                       help="a trained workdir: its evaluated weights and first --num_examples "
                            "test points (bench/autoattack_workdir.py) instead of a random model")
  compare.add_argument("--cpu_devices", type=int, default=None,
                       help="with --workdir: CPU devices for ours, as evaluate's flag (default: "
                            "one per usable core)")
  compare.add_argument("--torch-device", default="cpu")
  compare.add_argument("--config", default=workloads.DEFAULT_CONFIG)
  compare.add_argument("--json", default=None)
  synthetic = commands.add_parser(
      "synthetic_cifar10", help="write a SYNTHETIC TFDS cifar10 (random images) for timing")
  synthetic.add_argument("--data_dir", required=True)
  synthetic.add_argument("--num_train", type=int, default=50000)
  synthetic.add_argument("--num_test", type=int, default=10000)
  synthetic.add_argument("--json", default=None, help="where to note the dataset written")
  loop = commands.add_parser(
      "loop_rate", help="training images/s of a real run, from its metrics.jsonl")
  loop.add_argument("--workdir", required=True)
  loop.add_argument("--json", default=None)
  commands.add_parser("table", help="the markdown table of saved --json results").add_argument(
      "paths", nargs="+", metavar="RESULT.json")
  return parser


def _config(args):
  overrides = {"model.name": args.model, "model.width": args.width, "model.depth": args.depth,
               "model.widen": args.widen, "model.dtype": args.dtype,
               "train.batch_size": args.batch, "method": "clead"}
  if args.command == "train_step":
    overrides["attack.steps"] = args.pgd_steps
    overrides["attack.unroll"] = args.pgd_unroll
  return workloads.load_config(args.config, overrides)


def _references(args):
  """The PyTorch references --compare names, in order."""
  names = [n.strip() for n in (args.compare or "").split(",") if n.strip()]
  unknown = [n for n in names if n not in workloads.TORCH_REFERENCES]
  if unknown:
    raise UserError(f"--compare {args.compare}: unknown reference(s) {unknown}; choose from "
                    f"{sorted(workloads.TORCH_REFERENCES)}")
  return names


def _peak_flops(args):
  """The larger of XLA's and (when compared) PyTorch's large-matmul FLOP/s, in --dtype."""
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  peaks = {"jax_matmul": measure.matmul_peak_jax(dtype)}
  if _references(args):
    import torch  # pylint: disable=g-import-not-at-top
    size = 2048
    a = torch.randn(size, size, device=args.torch_device,
                    dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)

    def run():
      a @ a
      workloads._torch_sync(args.torch_device)  # pylint: disable=protected-access

    seconds, _ = measure.median_seconds(run, 5)
    peaks["torch_matmul"] = 2 * size**3 / seconds
  return max(peaks.values()), peaks


def _alternate(rounds, jax_fn, torch_fn):
  """JAX and PyTorch timings, alternated; the first JAX timing keeps its compile time."""
  jax_timings, torch_timings = [], []
  for _ in range(rounds):
    jax_timings.append(jax_fn())
    if torch_fn is not None:
      torch_timings.append(torch_fn())
  return jax_timings, torch_timings


def _merge(timings):
  if not timings:
    return None
  merged = timings[0]
  times = [t for timing in timings for t in timing.times]
  return workloads.Timing(merged.batch_size, statistics.median(times), times, merged.compile_s,
                          merged.flops_per_image, merged.profile)


def _summary(jax_timing, torch_timing, peak, peaks, label, args):
  achieved = jax_timing.flops_per_image * jax_timing.images_per_s
  result = {
      "jax_images_per_s": jax_timing.images_per_s,
      "torch_images_per_s": torch_timing.images_per_s if torch_timing else None,
      "ratio": jax_timing.images_per_s / torch_timing.images_per_s if torch_timing else None,
      "jax_compile_s": jax_timing.compile_s,
      "flops_per_image": jax_timing.flops_per_image,
      "achieved_flops": achieved,
      "peak_flops": peak,
      "device": measure.machine_description(),
      "versions": measure.versions(),
      "workload": label,
      "flops_method": FLOPS_METHOD,
      "peak_method": peaks,
      "jax_step_times_s": jax_timing.times,
      "torch_step_times_s": torch_timing.times if torch_timing else None,
      "batch": args.batch,
      "dtype": args.dtype,
      "conv": args.conv,
      "load_average_1min": os.getloadavg()[0],
      "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
      "command": args.command_line,
  }
  if _references(args):
    import torch  # pylint: disable=g-import-not-at-top
    result["torch_threads"] = torch.get_num_threads()
    result["torch_device"] = args.torch_device
  return result


def _print_profile(timing):
  if not timing.profile:
    return
  rows, kinds = timing.profile
  print("costliest XLA operations of one profiled run (ms, calls, instruction, jax op):")
  for ms, calls, instruction, op_name in rows:
    print(f"  {ms:9.1f} {calls:4d}  {instruction:32s} {op_name[-90:]}")
  total = sum(ms for _, ms in kinds)
  print(f"time per kind of XLA operation (of {total:.0f} ms):")
  for kind, ms in kinds[:10]:
    print(f"  {ms:9.1f} ms {100 * ms / total:5.1f}%  {kind}")


def _print(result):
  torch_part = ""
  if result["torch_images_per_s"] is not None:
    torch_part = (f"  torch {result['torch_images_per_s']:8.2f} img/s  "
                  f"ratio {result['ratio']:.2f}x")
  print(f"{result['workload']}: jax {result['jax_images_per_s']:8.2f} img/s{torch_part}  "
        f"compile {result['jax_compile_s']:.1f} s  "
        f"{result['flops_per_image'] / 1e9:.2f} GFLOP/img  "
        f"{result['achieved_flops'] / 1e9:.1f} of {result['peak_flops'] / 1e9:.1f} GFLOP/s peak "
        f"({100 * result['achieved_flops'] / result['peak_flops']:.0f}%)", flush=True)


def markdown_row(result) -> str:
  """The BENCHMARKS.md table row of one result."""
  torch_ips, ratio = result["torch_images_per_s"], result["ratio"]
  torch_cell = "-" if torch_ips is None else f"{torch_ips:.2f}"
  ratio_cell = "-" if ratio is None else f"{ratio:.2f}x"
  share = 100 * result["achieved_flops"] / result["peak_flops"]
  return (f"| {result['workload']} | {result['jax_images_per_s']:.2f} | {torch_cell} | "
          f"{ratio_cell} | {result['jax_compile_s']:.1f} | "
          f"{result['flops_per_image'] / 1e9:.2f} | {share:.0f}% |")


def _label(args, what):
  model = (f"wrn-{args.depth}-{args.widen}" if args.model == "wide_resnet"
           else f"{args.model} w{args.width}")
  conv = " autodiff-conv" if args.conv == "autodiff" else ""
  unroll = getattr(args, "pgd_unroll", 1)
  unroll = f" unroll{unroll}" if unroll != 1 else ""
  return f"{what} {model} b{args.batch} {args.dtype}{conv}{unroll}"


def train_step(args):
  config = _config(args)
  peak, peaks = _peak_flops(args)
  torch_fn = None
  references = _references(args)
  if references:
    torch_fn = lambda: workloads.torch_train_step(config, args.runs, args.warmup, args.torch_device,
                                                  references[0])

  def jax_fn():
    with workloads.convolutions(args.conv):
      return workloads.jax_train_step(config, args.runs, args.warmup, profile_dir=args.profile)

  jax_timings, torch_timings = _alternate(args.rounds, jax_fn, torch_fn)
  _print_profile(jax_timings[0])
  result = _summary(_merge(jax_timings), _merge(torch_timings), peak, peaks,
                    _label(args, f"clead pgd{args.pgd_steps}"), args)
  result["round_ratios"] = [j.images_per_s / t.images_per_s
                            for j, t in zip(jax_timings, torch_timings)]
  result["torch_reference"] = references[0] if references else None
  for reference in references[1:]:  # further references: their images/s and our ratio to them
    timing = workloads.torch_train_step(config, args.runs, args.warmup, args.torch_device,
                                        reference)
    result[f"{reference}_images_per_s"] = timing.images_per_s
    result[f"ratio_vs_{reference}"] = result["jax_images_per_s"] / timing.images_per_s
  _print(result)
  print(markdown_row(result))
  return result


def run_attacks(args):
  config = _config(args)
  peak, peaks = _peak_flops(args)
  results, notes = {}, []
  for name in [n.strip() for n in args.attacks.split(",") if n.strip()]:
    if name not in suite.WHITE_BOX_ATTACKS:
      notes.append(f"{name}: not a white-box evaluation attack (evaluation/suite.py); skipped")
      print(f"note: {notes[-1]}", flush=True)
      continue
    torch_fn = None
    if "torch" in _references(args) and name in TORCH_ATTACKS:
      steps, divisor = TORCH_ATTACKS[name]
      torch_fn = lambda steps=steps, divisor=divisor: workloads.torch_pgd(
          config, steps, divisor, args.batch, args.runs, args.warmup, args.torch_device)
    elif _references(args):
      notes.append(f"{name}: no PyTorch reference; JAX only")
      print(f"note: {notes[-1]}", flush=True)

    def jax_fn(name=name):
      with workloads.convolutions(args.conv):
        return workloads.jax_attack(config, name, args.batch, args.runs, args.warmup,
                                    profile_dir=args.profile)

    jax_timings, torch_timings = _alternate(args.rounds, jax_fn, torch_fn)
    _print_profile(jax_timings[0])
    result = _summary(_merge(jax_timings), _merge(torch_timings), peak, peaks,
                      _label(args, name), args)
    _print(result)
    print(markdown_row(result))
    results[name] = result
  return {"attacks": results, "notes": notes, "device": measure.machine_description(),
          "versions": measure.versions(), "peak_flops": peak}


def table(paths) -> str:
  """BENCHMARKS.md's tables of the --json results in `paths`: train steps and attacks (ours against
  PyTorch eager and, where measured, torch.compile), AutoAttack against the reference, and the
  real loop's rate; failed or skipped rows are listed as such."""
  steps = ["| workload | JAX img/s | PyTorch eager img/s | ratio | torch.compile img/s | ratio | "
           "compile s | GFLOP/img | share of peak |", "|---|---|---|---|---|---|---|---|---|"]
  others = []
  for path in paths:
    with open(path) as f:
      result = json.load(f)
    name = os.path.splitext(os.path.basename(path))[0]
    if "skipped" in result or "failed" in result:
      others.append(f"- {name}: {'skipped (' + result['skipped'] + ')' if 'skipped' in result else 'failed, exit ' + str(result['failed'])}")
    elif "forward_flops_per_image" in result:  # autoattack --workdir: its own table
      others.append(autoattack_workdir.markdown(result))
    elif "ours" in result:  # autoattack against the reference
      ours, reference = result["ours"], result.get("reference")
      stages = ", ".join(f"{stage} {v['accuracy_after']:.3f} in {v['time_s']:.1f} s"
                         for stage, v in ours["stages"].items())
      line = (f"- {result['workload']}: ours {ours['time_s']:.1f} s (robust "
              f"{ours['robust_accuracy']:.3f}; {stages})")
      if reference:
        line += (f"; reference {reference['time_s']:.1f} s (robust "
                 f"{reference['robust_accuracy']:.3f}); reference / ours {result['ratio']:.2f}")
      others.append(line)
    elif "loop_images_per_s" in result:
      others.append(f"- {name}: the training loop at {result['loop_images_per_s']:.1f} img/s "
                    f"({result['model']} b{result['batch']} {result['dtype']}, {result['data']})")
    elif "synthetic_cifar10" in result:
      continue
    else:
      for row in result["attacks"].values() if "attacks" in result else [result]:
        steps.append(_step_row(row))
  return "\n".join(steps + ([""] + others if others else []))


def _step_row(result) -> str:
  compiled = result.get("torch_compile_images_per_s")
  base = markdown_row(result).rstrip("|").rstrip().split(" | ")
  compiled_cells = (f"{compiled:.2f} | {result['ratio_vs_torch_compile']:.2f}x" if compiled
                    else "- | -")
  return " | ".join(base[:4] + [compiled_cells] + base[4:]) + " |"


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = _parser().parse_args(argv)
  if args.command == "table":
    print(table(args.paths))
    return {}
  args.command_line = "python -m clead_jax.bench " + " ".join(argv)
  if args.command == "autoattack":
    args.batch_size_given, args.batch = args.batch, args.batch or 256
    if args.workdir:  # what evaluate runs: one CPU device per core unless told otherwise
      parallel.use_cpu_cores_as_devices(args.cpu_devices)
  if args.command == "loop_rate":
    result = workloads.loop_rate(args.workdir)
    result["command"] = args.command_line
    print(json.dumps(result, indent=2), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return result
  if args.command == "synthetic_cifar10":
    written = workloads.write_synthetic_cifar10(args.data_dir, args.num_train, args.num_test)
    print(f"clead_jax.bench: SYNTHETIC cifar10 (random images) in {written}", flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"synthetic_cifar10": written}, f)
    return {}
  print(f"{measure.machine_description()}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}", flush=True)
  if args.command == "autoattack" and args.workdir:
    result = autoattack_workdir.compare(args.workdir, args.num_examples,
                                        reference=args.compare == "reference",
                                        batch_size=args.batch_size_given,
                                        torch_device=args.torch_device)
    result["command"] = args.command_line
    print(autoattack_workdir.markdown(result), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return result
  if args.command == "autoattack":
    config = workloads.load_config(args.config, {"model.name": args.model, "model.width": args.width,
                                                 "model.depth": args.depth,
                                                 "model.widen": args.widen,
                                                 "train.batch_size": min(args.num_examples, 128)})
    result = workloads.autoattack_compare(config, args.num_examples, args.batch,
                                          epsilon=args.epsilon,
                                          reference=args.compare == "reference",
                                          torch_device=args.torch_device)
    result.update(device=measure.machine_description(), versions=measure.versions(),
                  command=args.command_line, workload=f"autoattack {args.model} "
                  f"n{args.num_examples}")
    print(json.dumps(result, indent=2), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return result
  else:
    result = train_step(args) if args.command == "train_step" else run_attacks(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
  return result


def run():
  """The console script clead-bench: bad input is one line and exit code 2."""
  from clead_jax import command_line  # pylint: disable=g-import-not-at-top
  from clead_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    main()
  except ModuleNotFoundError as e:
    if e.name != "torch":
      raise
    command_line.fail("--compare torch needs PyTorch, an optional extra: pip install -e '.[torch]' "
                      "(or pip install torch) and run again")
  except (UserError, ValueError, OSError) as e:
    command_line.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == "__main__":
  run()

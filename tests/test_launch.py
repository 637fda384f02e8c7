"""The launch scripts parse, and their dry runs print exactly the commands a real run executes.

Real runs here call fake gcloud/srun/kubectl that record their arguments; launch/local.sh runs for
real in tests/test_multiprocess.py.
"""

import os
import shlex
import signal
import stat
import subprocess
import time

import pytest

from tests.conftest import REPO

SCRIPTS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/slurm.sbatch", "launch/gke.sh",
           "launch/gpu_bench.sh", "launch/gpu_cifar10_short.sh", "launch/gpu_fashion_mnist.sh",
           "launch/dry_run.sh", "launch/study_slurm.sh", "launch/gke_study.sh",
           "launch/gpu_session.sh"]
MAIN_ARGS = ["--config", "configs/cifar10.py", "--workdir", "/shared/runs/a b",
             "--config.eval.attacks=pgd20,cw", "--config.train.init_from=it's"]


@pytest.fixture
def fake_tools(tmp_path):
  """A PATH directory whose gcloud, srun and kubectl append their argv to a log and succeed."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.log"
  for tool in ("gcloud", "srun", "kubectl"):
    path = bin_dir / tool
    path.write_text("#!/usr/bin/env bash\n"
                    f"{{ printf '%q ' {tool} \"$@\"; echo; }} >> {shlex.quote(str(log))}\n"
                    "[[ -t 0 ]] || cat > /dev/null\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
  return env, log


def _run(args, env, dry_run):
  env = dict(env, DRY_RUN="1" if dry_run else "0")
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                        check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def _printed(output):
  """The commands a dry run printed ('+ cmd args...'), as argv lists."""
  return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]


def _logged(log):
  return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", script], cwd=REPO, check=True)


def test_local_dry_run_prints_one_command_per_process():
  env = dict(os.environ, DRY_RUN="1", PORT="23456", PYTHON="python3", XLA_FLAGS="--xla_foo=1")
  output = subprocess.run(["bash", "launch/local.sh", "3", "4", "--", *MAIN_ARGS], cwd=REPO,
                          env=env, capture_output=True, text=True, check=True).stdout
  lines = output.splitlines()
  assert lines[-1] == "wait"
  commands = [shlex.split(line.rstrip(" &")) for line in lines[:-1]]
  assert len(commands) == 3
  for process_id, argv in enumerate(commands):
    assert argv == ["JAX_PLATFORMS=cpu",
                    "XLA_FLAGS=--xla_foo=1 --xla_force_host_platform_device_count=4",
                    "python3", "-m", "clead_jax.main", "--coordinator_address=127.0.0.1:23456",
                    "--num_processes=3", f"--process_id={process_id}", *MAIN_ARGS]


def test_local_rejects_bad_counts():
  proc = subprocess.run(["bash", "launch/local.sh", "two", "4"], cwd=REPO, capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 2 and "usage:" in proc.stderr


def test_tpu_pod_dry_run_is_what_runs(fake_tools):
  env, log = fake_tools
  env = dict(env, TPU_NAME="pod", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-32", BUCKET="bkt")
  printed = _printed(_run(["bash", "launch/tpu_pod.sh", "all", "--", *MAIN_ARGS], env, True))
  assert not _logged(log)  # the dry run ran nothing
  assert [argv[:5] for argv in printed if argv[0] == "gcloud"] == [
      ["gcloud", "compute", "tpus", "tpu-vm", verb]
      for verb in ("create", "scp", "ssh", "ssh", "delete")]
  create, _, scp, install, train, delete = printed
  assert "--accelerator-type=v4-32" in create and "--zone=us-central2-b" in create
  assert "--worker=all" in scp and "--worker=all" in install and "--worker=all" in train
  assert "pip install" in install[-1] and "gcsfuse --implicit-dirs bkt /mnt/clead" in install[-1]
  remote = train[-1].removeprefix("--command=")
  assert shlex.split(remote)[:6] == ["cd", "clead_jax", "&&", "python3", "-m", "clead_jax.main"]
  assert shlex.split(remote)[6:] == MAIN_ARGS
  assert delete[-1] == "--quiet"

  _run(["bash", "launch/tpu_pod.sh", "all", "--", *MAIN_ARGS], env, False)
  assert _logged(log) == [argv for argv in printed if argv[0] == "gcloud"]


def test_slurm_dry_run_is_what_runs(fake_tools):
  env, log = fake_tools
  printed = _printed(_run(["bash", "launch/slurm.sbatch", *MAIN_ARGS], env, True))
  assert printed == [["srun", "--kill-on-bad-exit=1", "python3", "-m", "clead_jax.main",
                      *MAIN_ARGS]]
  assert not _logged(log)
  _run(["bash", "launch/slurm.sbatch", *MAIN_ARGS], env, False)
  assert _logged(log) == printed
  with open(os.path.join(REPO, "launch/slurm.sbatch")) as f:
    directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
  assert "--ntasks-per-node=8" in directives and "--gpus-per-node=8" in directives


def test_gke_manifest_and_commands(fake_tools):
  yaml = pytest.importorskip("yaml")
  env, log = fake_tools
  env = dict(env, IMAGE="us-docker.pkg.dev/p/r/clead-jax:1", BUCKET="bkt", NUM_PROCESSES="4",
             GPUS_PER_POD="8", JOB_NAME="cl")
  output = _run(["bash", "launch/gke.sh", "apply", "--", *MAIN_ARGS], env, True)
  assert not _logged(log)
  manifest = output[:output.index("+ kubectl apply")]
  service, job = yaml.safe_load_all(manifest)
  assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
  assert job["spec"]["completionMode"] == "Indexed"
  assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
  pod = job["spec"]["template"]["spec"]
  assert pod["subdomain"] == service["metadata"]["name"] == "cl"
  container = pod["containers"][0]
  assert container["image"] == "us-docker.pkg.dev/p/r/clead-jax:1"
  assert container["command"] + container["args"] == ["python3", "-m", "clead_jax.main",
                                                      *MAIN_ARGS]
  assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
  env_vars = {e["name"]: e for e in container["env"]}
  assert env_vars["JAX_COORDINATOR_ADDRESS"]["value"] == "cl-0.cl:1234"
  assert env_vars["JAX_NUM_PROCESSES"]["value"] == "4"
  assert "job-completion-index" in env_vars["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]

  _run(["bash", "launch/gke.sh", "apply", "--", *MAIN_ARGS], env, False)
  for action in ("logs", "delete"):
    printed = _printed(_run(["bash", "launch/gke.sh", action], env, True))
    _run(["bash", "launch/gke.sh", action], env, False)
    assert _logged(log)[-1] == printed[0]
  assert _logged(log)[0] == ["kubectl", "apply", "-f", "-"]


def test_gke_apply_needs_image_and_bucket():
  env = {k: v for k, v in os.environ.items() if k not in ("IMAGE", "BUCKET")}
  proc = subprocess.run(["bash", "launch/gke.sh", "apply", "--", *MAIN_ARGS], cwd=REPO, env=env,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 2 and "set IMAGE and BUCKET" in proc.stderr


def _fake_python(tmp_path, body):
  """An interpreter for launch/local.sh whose process i runs `body` with $id = i."""
  path = tmp_path / "python"
  path.write_text("#!/usr/bin/env bash\n"
                  "for arg; do [[ $arg == --process_id=* ]] && id=${arg#--process_id=}; done\n"
                  f"{body}\n")
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


def test_local_stops_the_others_when_a_process_fails(tmp_path):
  """Process 1 fails at once; process 0 would wait forever (as in a collective)."""
  python = _fake_python(tmp_path, f'[[ $id == 1 ]] && exit 3; echo $$ > {tmp_path}/waiter; '
                                  'trap "" TERM; while :; do sleep 0.1; done')
  proc = subprocess.run(["bash", "launch/local.sh", "2", "1", "--", "--workdir", "w"], cwd=REPO,
                        env=dict(os.environ, PYTHON=python, PORT="1", GRACE="1"),
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 3, proc.stderr
  assert "process 1 exited with status 3" in proc.stderr
  waiter = int((tmp_path / "waiter").read_text())
  with pytest.raises(ProcessLookupError):  # SIGTERM ignored, so it got SIGKILL after GRACE
    os.kill(waiter, 0)


def test_local_passes_sigterm_on(tmp_path):
  """SIGTERM to the script reaches every process, which stop cleanly: exit status 0."""
  python = _fake_python(tmp_path, f'trap "echo stopped > {tmp_path}/$id; exit 0" TERM; '
                                  f'touch {tmp_path}/started.$id; while :; do sleep 0.1; done')
  launch = subprocess.Popen(["bash", "launch/local.sh", "2", "1", "--", "--workdir", "w"],
                            cwd=REPO, env=dict(os.environ, PYTHON=python, PORT="1"))
  try:
    for _ in range(100):
      if all((tmp_path / f"started.{i}").exists() for i in range(2)):
        break
      time.sleep(0.1)
    launch.send_signal(signal.SIGTERM)
    assert launch.wait(timeout=30) == 0
  finally:
    launch.kill()
  assert [(tmp_path / str(i)).read_text().strip() for i in range(2)] == ["stopped", "stopped"]


def test_gpu_bench_dry_run_lists_every_row_as_a_valid_bench_command():
  """ResNet-18 and WRN-34-10, batch 128 and 512, bfloat16 and float32, then PGD-20: nine
  commands, each of which the bench command's own parser accepts."""
  from clead_jax.bench import cli  # pylint: disable=g-import-not-at-top
  out = subprocess.run(["bash", "launch/gpu_bench.sh", "--dry-run", "OUT"], cwd=REPO, check=True,
                       capture_output=True, text=True).stdout
  commands = [shlex.split(line) for line in out.splitlines() if "clead_jax.bench" in line]
  assert len(commands) == 9, out
  rows = set()
  for argv in commands:
    bench_args = argv[argv.index("clead_jax.bench") + 1:]
    args = cli._parser().parse_args(bench_args)  # pylint: disable=protected-access
    assert args.json.startswith("OUT/")
    rows.add((args.command, args.model, args.batch, args.dtype))
  for model in ("resnet18", "wide_resnet"):
    for batch in (128, 512):
      for dtype in ("float32", "bfloat16"):
        assert ("train_step", model, batch, dtype) in rows
  assert ("attacks", "resnet18", 512, "float32") in rows


def test_gpu_bench_attack_suite_times_every_attack_of_the_readme_table():
  """SUITE=attacks: the README's ResNet-18 attack-time table at width 64, batch 256; an unknown
  SUITE is one error line and exit 2."""
  from clead_jax.bench import cli  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, SUITE="attacks")
  out = subprocess.run(["bash", "launch/gpu_bench.sh", "--dry-run", "OUT"], cwd=REPO, check=True,
                       capture_output=True, text=True, env=env).stdout
  names = []
  for line in out.splitlines():
    if "clead_jax.bench" in line:
      argv = shlex.split(line)
      args = cli._parser().parse_args(argv[argv.index("clead_jax.bench") + 1:])  # pylint: disable=protected-access
      assert (args.command, args.model, args.width, args.batch) == ("attacks", "resnet18", 64, 256)
      names += args.attacks.split(",")
  assert sorted(names) == ["autoattack", "cw", "fgsm", "pgd100", "pgd20"]
  env["SUITE"] = "inference"
  bad = subprocess.run(["bash", "launch/gpu_bench.sh", "--dry-run", "OUT"], cwd=REPO,
                       capture_output=True, text=True, env=env)
  assert bad.returncode == 2 and "SUITE=inference" in bad.stderr


def test_gpu_cifar10_short_dry_run_prints_the_training_command():
  out = subprocess.run(["bash", "launch/gpu_cifar10_short.sh", "--dry-run", "WORK"], cwd=REPO,
                       check=True, capture_output=True, text=True,
                       env=dict(os.environ, EPOCHS="3")).stdout
  train = next(shlex.split(line) for line in out.splitlines() if "clead_jax.main" in line)
  assert train[train.index("--config") + 1] == "configs/cifar10.py"
  assert "--workdir" in train and train[train.index("--workdir") + 1] == "WORK"
  assert "--config.train.epochs=3" in train and "--config.eval.num_examples=1000" in train


def test_gpu_fashion_mnist_dry_run_prepares_then_runs_the_full_study():
  """The dry run prints the prepare command and the study command, and both parse as the real
  commands' flags (checked by running them with --help would import JAX: the flags are checked
  against the commands' own definitions instead)."""
  env = dict(os.environ, IDX_DIR="/data/idx", DATA_DIR="/data/tfds", EPOCHS="2")
  out = subprocess.run(["bash", "launch/gpu_fashion_mnist.sh", "--dry-run", "WORK"], cwd=REPO,
                       check=True, capture_output=True, text=True, env=env).stdout
  commands = [shlex.split(line) for line in out.splitlines() if " -m clead_jax." in line]
  prepare, study = commands[0], next(c for c in commands if "clead_jax.study" in c)
  assert prepare[prepare.index("-m") + 1:] == ["clead_jax.prepare", "fashion_mnist", "--data_dir",
                                               "/data/tfds", "--from", "/data/idx"]
  assert study[:4] == ["timeout", "--signal=TERM", "--kill-after=120", "3000"]
  assert study[study.index("--config") + 1] == "configs/fashion_mnist.py"
  assert study[study.index("--methods") + 1] == "standard,pgd_at,trades,clead"
  assert study[study.index("--workdir") + 1] == "WORK"
  for flag in ("--config.data.data_dir=/data/tfds", "--config.train.epochs=2",
               "--config.eval.num_examples=-1",
               "--config.eval.attacks=fgsm,pgd20,pgd100,cw,autoattack,transfer_pgd3"):
    assert flag in study, flag
  # Every --config.* override names a real field of the recipe.
  from clead_jax import config_tools  # pylint: disable=g-import-not-at-top
  config = config_tools.load_config_file(os.path.join(REPO, "configs", "fashion_mnist.py"))
  for arg in study:
    if arg.startswith("--config."):
      field, value = arg[len("--config."):].split("=", 1)
      config_tools.set_field(config, field, config_tools.parse_value(
          value, config_tools.get_field(config, field)))
  from clead_jax import config_checks  # pylint: disable=g-import-not-at-top
  config.eval.surrogate = "WORK/standard/seed0"  # the study sets each run's surrogate
  config_checks.validate(config)


def test_gpu_bench_compare_suite_has_every_row_of_the_comparison():
  """SUITE=compare: ResNet-18 b512 bf16 against eager and torch.compile, b512 fp32, b128 bf16,
  WRN-34-10 b128 bf16, AutoAttack against the reference, and the real loop on a synthetic TFDS
  dataset beside the step at the same model, batch and dtype; every row parses."""
  from clead_jax import config_tools  # pylint: disable=g-import-not-at-top
  from clead_jax.bench import cli  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, SUITE="compare")
  out = subprocess.run(["bash", "launch/gpu_bench.sh", "--dry-run", "OUT"], cwd=REPO, check=True,
                       capture_output=True, text=True, env=env).stdout
  rows, loop, trained, on_workdir = set(), None, None, None
  for line in out.splitlines():
    argv = shlex.split(line)
    if "clead_jax.bench" in argv:
      args = cli._parser().parse_args(argv[argv.index("clead_jax.bench") + 1:])  # pylint: disable=protected-access
      if args.command == "train_step":
        rows.add((args.model, args.batch, args.dtype, args.compare))
      else:
        rows.add((args.command, getattr(args, "compare", None)))
      if getattr(args, "workdir", None):
        on_workdir = args
    elif "clead_jax.main" in argv:
      main_args = argv[argv.index("clead_jax.main") + 1:]
      if "configs/digits.py" in main_args:
        trained = main_args
      else:
        loop = main_args
  # The CPU table's AutoAttack bench on a trained model, on the GPU: the quickstart's model,
  # trained first, ours against the reference on all 360 test points.
  assert trained[trained.index("--workdir") + 1] == on_workdir.workdir == "OUT/digits"
  assert (on_workdir.command, on_workdir.compare, on_workdir.num_examples,
          on_workdir.torch_device) == ("autoattack", "reference", 360, "cuda")
  assert ("resnet18", 512, "bfloat16", "torch,torch_compile") in rows
  for row in (("resnet18", 512, "float32", "torch"), ("resnet18", 128, "bfloat16", "torch"),
              ("wide_resnet", 128, "bfloat16", "torch"), ("resnet18", 128, "float32", "torch"),
              ("autoattack", "reference"), ("synthetic_cifar10", None), ("loop_rate", None)):
    assert row in rows, row
  config = config_tools.load_config_file(os.path.join(REPO, loop[loop.index("--config") + 1]))
  for arg in loop:
    if arg.startswith("--config."):
      field, value = arg[len("--config."):].split("=", 1)
      config_tools.get_field(config, field)  # a real field
  assert (config.model.name, config.train.batch_size, config.model.dtype) == (
      "resnet18", 128, "float32")  # the step row it is compared with


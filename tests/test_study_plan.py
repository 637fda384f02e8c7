"""A study as a plan of independent runs (--plan, --run_index, --collect): separate processes,
two at once, give the study the sequential command gives."""

import fcntl
import json
import os
import shlex
import subprocess
import sys

import pytest

from clead_jax import workdir_lock
from clead_jax.errors import UserError
from clead_jax.study import runs as study
from tests import processes
from tests import slurm_cluster
from tests.processes import cache  # pylint: disable=unused-import
from tests.conftest import REPO
from tests.test_study import _config
from tests.test_study import TINY_FLAGS

# Two methods of a tiny digits run (two epochs: long enough to stop one mid-way): two seeds each
# where only the plan is made (dry runs), one seed each where the runs train.
_TINY_STUDY = ["--config", "configs/digits.py", "--methods", "pgd_at,clead", *TINY_FLAGS,
               "--config.train.epochs=2"]
STUDY = [*_TINY_STUDY, "--seeds", "2"]
TRAINED_STUDY = [*_TINY_STUDY, "--seeds", "1"]
# What differs between two invocations of one study: when and how long, and by which command.
_TIMING_KEYS = {"wall_time_s", "command", "train_time_s", "eval_time_s"}


def _study(workdir, *extra, cache=""):
  return [sys.executable, "-m", "clead_jax.study", *TRAINED_STUDY, "--workdir", str(workdir),
          f"--config.compilation_cache_dir={cache}", *extra]


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, cache):  # pylint: disable=redefined-outer-name
  """study.json of the study run by the plain command, one run after another."""
  workdir = tmp_path_factory.mktemp("sequential")
  result = processes.run(_study(workdir, cache=cache))
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads((workdir / "study.json").read_text())


def without_timings(value):
  if isinstance(value, dict):
    return {k: without_timings(v) for k, v in value.items() if k not in _TIMING_KEYS}
  if isinstance(value, list):
    return [without_timings(v) for v in value]
  return value


def test_plan_lists_every_run_once_with_its_surrogate(tmp_path, capsys):
  config = _config(**{"eval.attacks": "pgd20,transfer_pgd3"})
  written = study.print_plan(config, str(tmp_path), ["clead", "standard"], 2)
  lines = capsys.readouterr().out.splitlines()
  assert [e["label"] for e in written["runs"]] == ["standard seed 0", "standard seed 1",
                                                  "clead seed 0", "clead seed 1"]
  assert [e["needs"] for e in written["runs"]] == [None, None, 0, 1]
  assert lines[2].split("\t")[:4] == ["2", "clead seed 0", "seed 0", os.path.join("clead", "seed0")]
  assert "after run 0" in lines[2]
  assert json.loads((tmp_path / "plan.json").read_text()) == written
  # The same study again is fine; another one in the same directory is one clear error.
  study.print_plan(config, str(tmp_path), ["clead", "standard"], 2)
  with pytest.raises(UserError, match="plan.json is the plan of another study"):
    study.print_plan(config, str(tmp_path), ["clead", "standard"], 3)
  with pytest.raises(UserError, match=r"--run_index=4: the study has runs 0 to 3"):
    study.run_index(config, str(tmp_path), ["clead", "standard"], 2, 4)


def test_a_run_whose_surrogate_has_not_finished_says_so(tmp_path):
  config = _config(**{"eval.attacks": "pgd20,transfer_pgd3"})
  must_not_train = lambda config, directory: pytest.fail(f"trained {directory}")
  with pytest.raises(UserError, match=r"needs its transfer surrogate, run 0 \(standard seed 0\)"):
    study.run_index(config, str(tmp_path), ["clead", "standard"], 1, 1,
                    train_fn=must_not_train, surrogate_wait_s=0.0)


@pytest.mark.slow
def test_runs_as_separate_processes_give_the_sequential_study(sequential, tmp_path, cache):  # pylint: disable=redefined-outer-name
  spread = tmp_path / "spread"
  result = processes.run(_study(spread, "--plan", cache=cache))
  assert result.returncode == 0, result.stderr[-3000:]
  plan = json.loads((spread / "plan.json").read_text())
  assert len(plan["runs"]) == 2 and len(result.stdout.strip().splitlines()) == 2
  # Both at once, as two machines would (each writes only its own run).
  started = [processes.start(_study(spread, f"--run_index={k}", cache=cache)) for k in (0, 1)]
  for process in started:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  assert not (spread / "study.json").exists()  # only --collect writes the summary
  again = processes.run(_study(spread, "--run_index=1", cache=cache))
  assert again.returncode == 0 and "finished earlier" in again.stdout
  result = processes.run(_study(spread, "--collect", cache=cache))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "2 of 2 runs finished" in result.stdout
  assert without_timings(json.loads((spread / "study.json").read_text())) == without_timings(
      sequential)


def _slurm_env(env):
  return dict(env, **{k: v for k, v in processes.env().items()
                      if k in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", "XLA_FLAGS")},
              PYTHON=sys.executable, GPUS_PER_TASK="0", CPUS_PER_TASK="1", TIME_LIMIT="30:00")


def _unlocked(path):
  """Whether no process holds the workdir lock file `path`."""
  try:
    fd = os.open(path, os.O_RDWR)
  except FileNotFoundError:
    return True
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True
  except BlockingIOError:
    return False
  finally:
    os.close(fd)


def _submit(env, workdir, cache, runs=None):
  env = dict(env, RUNS=runs) if runs else env
  result = subprocess.run(["bash", "launch/study_slurm.sh", *TRAINED_STUDY, "--workdir",
                           str(workdir), f"--config.compilation_cache_dir={cache}",
                           "--config.train.checkpoint_every=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_the_study_on_a_real_slurm(sequential, tmp_path, cache):  # pylint: disable=redefined-outer-name
  """launch/study_slurm.sh on a one-node SLURM: a job array of the two runs (at once on the
  node's two CPUs) and the collection after it; one task cancelled mid-training and resubmitted
  resumes its run; the table is the sequential study's."""
  with slurm_cluster.cluster(tmp_path / "slurm") as env:
    env = _slurm_env(env)
    workdir = tmp_path / "study"
    _submit(env, workdir, cache)
    # Cancel run 1 once it has saved a checkpoint: suspended first (SIGSTOP), so that it cannot
    # finish meanwhile, then cancelled (SIGCONT, SIGTERM: it saves its step and stops).
    checkpoints = workdir / "clead" / "seed0" / "checkpoints"
    slurm_cluster.wait(lambda: checkpoints.is_dir() and any(
        p.name.isdigit() for p in checkpoints.iterdir()), 300, "run 1's first checkpoint")
    task = next(line.split()[0] for line in slurm_cluster.queue(env)
                if line.split()[0].endswith("_1"))
    subprocess.run(["scontrol", "suspend", task], env=env, check=True, timeout=30)
    subprocess.run(["scancel", task], env=env, check=True, timeout=30)
    slurm_cluster.wait(lambda: not slurm_cluster.queue(env), 600, "the array and the collection")
    assert not (workdir / "clead" / "seed0" / "report.json").exists()
    summary = json.loads((workdir / "study.json").read_text())
    assert summary["missing_runs"] == ["clead seed 0"]

    # Where processes are tracked by parent (no cgroups, as here), SLURM can drop the cancelled
    # task from the queue before its process has saved its checkpoint and exited; resubmitted
    # then, the run meets the workdir lock ("is in use by another process"). Wait for the lock,
    # as a user told so would.
    lock = workdir / "clead" / "seed0" / workdir_lock.LOCK_FILE
    slurm_cluster.wait(lambda: _unlocked(lock), 120, "the cancelled run's process to exit")
    _submit(env, workdir, cache, runs="1")
    slurm_cluster.wait(lambda: not slurm_cluster.queue(env), 600, "the resubmitted run")
    outputs = sorted((workdir / "slurm").glob("clead_study_runs-*_1.out"))
    assert len(outputs) == 2
    assert "resuming from step" in outputs[-1].read_text(), outputs[-1].read_text()[-3000:]
    collected = sorted((workdir / "slurm").glob("clead_study_collect-*.out"))
    assert len(collected) == 2 and "2 of 2 runs finished" in collected[-1].read_text()
  assert without_timings(json.loads((workdir / "study.json").read_text())) == without_timings(
      sequential)


def test_slurm_dry_run_submits_the_plan_as_arrays_then_the_collection(tmp_path):
  env = dict(processes.env(), DRY_RUN="1", PYTHON=sys.executable, PARTITION="gpu",
             TIME_LIMIT="2:00:00")
  workdir = tmp_path / "a b"
  result = subprocess.run(["bash", "launch/study_slurm.sh", *STUDY, "--methods=standard,clead",
                           "--config.eval.attacks=pgd20,transfer_pgd3", "--workdir", str(workdir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  submitted = [shlex.split(line[2:]) for line in result.stderr.splitlines()
               if line.startswith("+ sbatch")]
  assert len(submitted) == 3
  options = [dict(a.split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
             for argv in submitted]
  assert [o.get("--array") for o in options] == ["0,1", "2,3", None]
  assert "--dependency" not in options[0]
  assert options[1]["--dependency"] == "afterany:<clead_study_runs>"
  assert options[2]["--dependency"] == ("afterany:<clead_study_runs>:"
                                        "<clead_study_after_surrogates>")
  assert all(o["--partition"] == "gpu" and o["--time"] == "2:00:00" for o in options)
  assert options[0]["--gpus-per-task"] == "1"
  for argv, mode in zip(submitted, ["--run_index=$SLURM_ARRAY_TASK_ID"] * 2 + ["--collect"]):
    command = shlex.split(options[submitted.index(argv)]["--wrap"].split(" && ", 1)[1])
    assert command[:4] == ["exec", sys.executable, "-m", "clead_jax.study"]
    assert command[-1] == mode and str(workdir) in command
  assert json.loads((workdir / "plan.json").read_text())["runs"][2]["needs"] == 0


def test_gke_study_is_an_indexed_job_of_the_plan(tmp_path):
  yaml = pytest.importorskip("yaml")
  env = dict(processes.env(), DRY_RUN="1", PYTHON=sys.executable, IMAGE="img:1", BUCKET="bkt",
             JOB_NAME="st", PARALLELISM="2")
  args = [*STUDY, "--workdir", "/runs/study"]
  result = subprocess.run(["bash", "launch/gke_study.sh", "apply", "--", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  job = yaml.safe_load(result.stdout[:result.stdout.index("+ kubectl apply")])
  assert job["spec"]["completionMode"] == "Indexed"
  assert job["spec"]["completions"] == 4 and job["spec"]["parallelism"] == 2
  container = job["spec"]["template"]["spec"]["containers"][0]
  assert container["image"] == "img:1"
  assert container["command"] + container["args"] == [
      "python3", "-m", "clead_jax.study", *args, "--run_index=$(JOB_COMPLETION_INDEX)",
      "--surrogate_wait_s=86400"]
  result = subprocess.run(["bash", "launch/gke_study.sh", "collect", "--", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-3000:]
  job = yaml.safe_load(result.stdout[:result.stdout.index("+ kubectl apply")])
  assert job["metadata"]["name"] == "st-collect" and job["spec"]["completions"] == 1
  assert job["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "--collect"


def test_collect_lists_the_runs_not_finished(tmp_path):
  from tests.test_study import _fake_report, fake_final_weights  # pylint: disable=g-import-not-at-top
  config = _config()
  fake = lambda c, d: _fake_report(c, d, 0.9, {"pgd20": 0.5})
  study.run_index(config, str(tmp_path), ["pgd_at", "clead"], 1, 1, train_fn=fake,
                  final_weights=fake_final_weights)
  summary = study.collect(config, str(tmp_path), ["pgd_at", "clead"], 1,
                          final_weights=fake_final_weights)
  assert summary["missing_runs"] == ["pgd_at seed 0"]
  assert [row["seeds_finished"] for row in summary["rows"]] == [[], [0]]
  assert "Not finished (not in the table): pgd_at seed 0." in (tmp_path / "study.md").read_text()


def test_the_modes_exclude_each_other(tmp_path):
  result = subprocess.run(_study(tmp_path, "--plan", "--collect"), cwd=REPO, env=processes.env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --plan and --collect: give at most one of --plan, --run_index, --collect")


_HOLD_SUMMARY_LOCK = """
import sys, time
from clead_jax import workdir_lock
workdir_lock.enable()
workdir_lock.acquire(sys.argv[1], lock_file="study.lock")
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.slow  # real processes
def test_one_writer_per_summary_and_studies_of_other_sweeps_share_the_directory(tmp_path):
  """The study without sweeps writes DIR/study.md under DIR/study.lock: while another process
  holds that lock, the same study stops with one line, and a study of another sweep (an ablation
  sharing DIR's runs) goes on."""
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_SUMMARY_LOCK, str(tmp_path)], cwd=REPO,
                            env=processes.env(), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    same = processes.run(_study(tmp_path, "--collect"), timeout=300)
    assert same.returncode == 2, same.stderr[-2000:]
    assert processes.messages(same.stderr)[-1].startswith(
        f"error: --workdir {tmp_path} is in use by another process (pid {holder.pid}: "), same.stderr
    assert not (tmp_path / "study.md").exists()
    other = processes.run(_study(tmp_path, "--collect", "--sweep", "config.train.epochs=1,2"),
                          timeout=300)
    assert other.returncode == 0, other.stderr[-2000:]
    assert "Not finished (not in the table): " in (tmp_path / "study_train.epochs.md").read_text()
  finally:
    holder.kill()
    holder.wait()

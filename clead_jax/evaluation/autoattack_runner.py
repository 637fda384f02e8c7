"""AutoAttack over a whole split: stage by stage, each run (restart x target) only on the points
still robust, in batches sharded over every device; resumable.

Example i's key is perturbation.example_keys(seed, i), split and folded with the stage and the
run exactly as autoattack.versions.autoattack_flags does, so the Runner and the one-jit
composition give the same per-example results, and so does a Runner that was stopped and
resumed.

Resuming: with `state_path`, the Runner saves its progress (the per-example robust flags, the
stage, the run and the batches of the run already done) at every stage boundary, at most every
`save_every_s` seconds within a stage, and when a stop is requested (clead_jax/stopping.py). A
later Runner with the same identity (checkpoint, epsilon, norm, examples, version, seed) picks up
there; a state of another identity is moved aside with one warning line and the Runner starts over.
"""

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from clead_jax import input_pipeline
from clead_jax import parallel
from clead_jax import perturbation
from clead_jax import stopping
from clead_jax.autoattack import common
from clead_jax.autoattack import versions
from clead_jax.evaluation import sharded

SAVE_EVERY_S = 60.0


@dataclasses.dataclass
class Result:
  """Per-example outcome of one AutoAttack version over a split."""
  name: str  # autoattack, autoattack_plus or autoattack_rand
  stage_names: list
  black_box: list  # per stage
  clean: np.ndarray  # (n,) bool: classified correctly
  robust_after: np.ndarray  # (num_stages, n) bool: still robust after each stage
  time_s: float
  stage_times_s: list = None  # seconds of each stage in this process (None: resumed mid-way)


@dataclasses.dataclass
class _Progress:
  """Where a Runner is: what it saves and resumes from."""
  clean: np.ndarray
  robust: np.ndarray  # now
  robust_after: list  # one array per finished stage
  stage: int = 0
  run: int = 0
  run_todo: np.ndarray = None  # the examples the current run attacks (fixed at its start)
  chunks_done: int = 0  # batches of the current run already attacked
  size: int = 0  # the padded batch size in use (kept so that resumed batches have equal shapes)
  elapsed_s: float = 0.0
  batch_size: int = 0  # the Runner's batch size and device count that cut the current run into
  devices: int = 0  # batches (0: unknown, a state saved before they were recorded)


class Runner:
  """Runs one AutoAttack version over a split with a mesh, batch size and seed.

  apply_fn(variables, x) -> (logits, embedding) must be deterministic. `settings` go to
  versions.stages() (the reference's defaults; tests shrink them).
  """

  def __init__(self, apply_fn, mesh, norm, batch_size, seed, name="autoattack",
               compiler_options=None, save_every_s=SAVE_EVERY_S, **settings):
    self.apply_fn = apply_fn
    self.compiler_options = compiler_options
    self.mesh = mesh
    self.norm = norm
    self.seed = seed
    self.name = name
    self.version = versions.ATTACK_NAMES[name]
    self.settings = settings
    self.save_every_s = save_every_s
    self.batch_size = sharded.round_up_to_devices(batch_size, mesh.devices.size)
    self._compiled = {}

  def _jit(self, fn):
    data = parallel.batch_sharding(self.mesh)
    return jax.jit(fn, in_shardings=(parallel.replicated(self.mesh), data, data, data, None, None),
                   out_shardings=data, compiler_options=self.compiler_options)

  def _clean_fn(self):
    if "clean" not in self._compiled:
      def correct(variables, images, labels, indices, epsilon, run_index):
        del indices, epsilon, run_index
        logits, _ = self.apply_fn(variables, input_pipeline.to_float(images))
        return jnp.argmax(logits, -1) == labels
      self._compiled["clean"] = self._jit(correct)
    return self._compiled["clean"]

  def _stage_fn(self, index, num_classes):
    """correct(variables, images, labels, indices, epsilon, run_index): run `run_index` of the
    stage, then whether the model still classifies the result correctly."""
    if (index, num_classes) not in self._compiled:
      apply_fn = self.apply_fn

      def correct(variables, images, labels, indices, epsilon, run_index):
        x = input_pipeline.to_float(images)
        # The same keys as autoattack_flags: (example keys -> split -> stage -> run).
        keys, _ = perturbation.split_keys(perturbation.example_keys(self.seed, indices), 2)
        keys = perturbation.fold_in(versions.stage_keys(keys, index), run_index)
        # The stage is rebuilt under the trace so that epsilon can be traced.
        traced = versions.stages(self.version, num_classes, epsilon=epsilon, norm=self.norm,
                                 **self.settings)[index]
        x_adv = traced.run(apply_fn, variables, x, labels, keys, run_index)
        logits, _ = apply_fn(variables, x_adv)
        return jnp.argmax(logits, -1) == labels

      self._compiled[index, num_classes] = self._jit(correct)
    return self._compiled[index, num_classes]

  # --- saving and resuming ---

  def _identity(self, epsilon, n, identity):
    return {"attack": self.name, "version": self.version, "norm": self.norm,
            "epsilon": float(epsilon), "num_examples": int(n), "seed": int(self.seed),
            "settings": {k: v for k, v in sorted(self.settings.items())}, **(identity or {})}

  @staticmethod
  def _write(state_path, identity, progress):
    if jax.process_index() != 0:
      return
    os.makedirs(os.path.dirname(state_path) or ".", exist_ok=True)
    arrays = {"clean": progress.clean, "robust": progress.robust,
              "robust_after": (np.stack(progress.robust_after) if progress.robust_after
                               else np.zeros((0, len(progress.clean)), bool)),
              "run_todo": (progress.run_todo if progress.run_todo is not None
                           else np.zeros((0,), np.int64))}
    meta = {"identity": identity, "stage": progress.stage, "run": progress.run,
            "run_started": progress.run_todo is not None, "chunks_done": progress.chunks_done,
            "size": progress.size, "elapsed_s": progress.elapsed_s,
            "batch_size": progress.batch_size, "devices": progress.devices}
    tmp = state_path + ".tmp.npz"
    np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, state_path)

  @staticmethod
  def _read(state_path, identity):
    """The saved progress of this identity, or None (a state of another one is set aside)."""
    if not state_path or not os.path.exists(state_path):
      return None
    try:
      with np.load(state_path) as saved:
        meta = json.loads(str(saved["meta"]))
        arrays = {k: saved[k] for k in ("clean", "robust", "robust_after", "run_todo")}
    except (OSError, ValueError, KeyError) as e:
      meta, arrays = {"unreadable": str(e)}, None
    if meta.get("identity") != identity:
      if jax.process_index() == 0:
        aside = f"{state_path}.stale-{int(time.time())}"
        os.replace(state_path, aside)
        stored = meta.get("identity") or meta
        differ = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
        print(f"warning: the saved AutoAttack progress {state_path} is of another evaluation "
              f"(differs in {', '.join(differ) or 'its contents'}); moved to {aside}, starting "
              "over", file=sys.stderr, flush=True)
      return None
    return _Progress(clean=arrays["clean"].astype(bool), robust=arrays["robust"].astype(bool),
                     robust_after=list(arrays["robust_after"].astype(bool)), stage=meta["stage"],
                     run=meta["run"],
                     run_todo=arrays["run_todo"] if meta["run_started"] else None,
                     chunks_done=meta["chunks_done"], size=meta["size"],
                     elapsed_s=meta["elapsed_s"], batch_size=meta.get("batch_size", 0),
                     devices=meta.get("devices", 0))

  def _rebatch(self, state, state_path):
    """A run stopped mid-way under another batch size or device count goes on with this
    Runner's: the examples it had not attacked yet become the run's examples (each example's
    result depends on its index only, not on its batch)."""
    devices = self.mesh.devices.size
    made_with = (state.batch_size or self.batch_size, state.devices or devices)
    if state.run_todo is None or made_with == (self.batch_size, devices):
      return
    done = state.chunks_done * sharded.chunk_length(len(state.run_todo), made_with[0])
    state.run_todo, state.chunks_done, state.size = state.run_todo[done:], 0, 0
    if jax.process_index() == 0:
      print(f"clead_jax: the saved {self.name} progress {state_path} was made with batch size "
            f"{made_with[0]} on {made_with[1]} device(s); continuing its run with batch size "
            f"{self.batch_size} on {devices} (results do not depend on either)", flush=True)

  # --- the run ---

  def run(self, variables, images, labels, epsilon, progress=False, state_path=None,
          identity=None) -> Result:
    """Clean accuracy, then each stage's runs on the examples still robust.

    `identity`: what else the state must match to be resumed (e.g. the checkpoint step).
    """
    start_time = time.time()
    n = len(labels)
    epsilon_traced = jnp.float32(epsilon)
    num_classes = common.num_classes_of(self.apply_fn, variables,
                                        input_pipeline.to_float(jnp.asarray(images[:1])))
    stage_list = versions.stages(self.version, num_classes, epsilon=float(epsilon),
                                 norm=self.norm, **self.settings)
    identity = self._identity(epsilon, n, identity)
    state = self._read(state_path, identity)
    if state is not None:
      self._rebatch(state, state_path)
    if state is not None and progress and jax.process_index() == 0:
      print(f"clead_jax: resuming {self.name} at stage {stage_list[state.stage].name if state.stage < len(stage_list) else 'end'}, "
            f"run {state.run} ({int(state.robust.sum())}/{n} still robust)", flush=True)
    run_map = functools.partial(sharded.map_examples, self.mesh, self.batch_size)
    if state is None:
      robust = run_map(functools.partial(self._clean_fn(), variables), images, labels,
                       np.arange(n), epsilon_traced, jnp.int32(0)).astype(bool)
      state = _Progress(clean=robust.copy(), robust=robust, robust_after=[])
    already = state.elapsed_s
    last_save = time.time()

    def save():
      nonlocal last_save
      if state_path:
        state.elapsed_s = already + time.time() - start_time
        self._write(state_path, identity, state)
      last_save = time.time()

    stage_times, resumed = [], state.stage > 0 or state.run > 0
    try:
      while state.stage < len(stage_list):
        stage_start = time.time()
        stage = stage_list[state.stage]
        fn = functools.partial(self._stage_fn(state.stage, num_classes), variables)
        bar = tqdm(total=stage.num_runs, initial=state.run, desc=f"{self.name}/{stage.name}",
                   disable=not progress, leave=False)
        while state.run < stage.num_runs:
          if state.run_todo is None:  # a new run: fix its examples and its batches
            state.run_todo = np.flatnonzero(state.robust)
            state.chunks_done = 0
            state.batch_size, state.devices = self.batch_size, self.mesh.devices.size
            if len(state.run_todo):
              # A stage compiles for its first run's batches, padded only to the device count
              # (stage k's points are a few of stage k-1's: a size kept from the stage before
              # padded APGD-T, FAB-T and Square on the quickstart model by half); its later runs
              # keep that size until their points halve, so that a stage compiles once.
              length = sharded.chunk_length(len(state.run_todo), self.batch_size)
              if (state.run == 0 or not state.size
                  or not state.size // 2 < length <= state.size):
                state.size = sharded.tight_size(length, self.batch_size, self.mesh.devices.size)
          todo = state.run_todo
          length = sharded.chunk_length(len(todo), self.batch_size) if len(todo) else 1
          if len(todo) and not state.size:  # rebatched on resume
            state.size = sharded.tight_size(length, self.batch_size, self.mesh.devices.size)
          state.batch_size, state.devices = self.batch_size, self.mesh.devices.size
          for start in range(state.chunks_done * length, len(todo), length):
            chunk = todo[start:start + length]
            state.robust[chunk] = run_map(fn, images, labels, chunk, epsilon_traced,
                                          jnp.int32(state.run), size=state.size,
                                          length=length).astype(bool)
            state.chunks_done += 1
            if time.time() - last_save >= self.save_every_s:
              save()
          state.run, state.run_todo = state.run + 1, None
          bar.update(1)
          bar.set_postfix(robust=f"{int(state.robust.sum())}/{n}")
        bar.close()
        stage_times.append(time.time() - stage_start)
        state.robust_after.append(state.robust.copy())
        state.stage, state.run = state.stage + 1, 0
        save()  # at every stage boundary
    except stopping.Stopped as stopped:
      save()
      where = (stage_list[state.stage].name if state.stage < len(stage_list) else "the end")
      stopped.what_was_kept = (
          f"{self.name} progress (stage {where}, run {state.run}) saved in {state_path}"
          if state_path else f"{self.name} was not saved (no state path)")
      raise
    return Result(self.name, [s.name for s in stage_list], [s.black_box for s in stage_list],
                  state.clean, np.stack(state.robust_after),
                  already + time.time() - start_time, None if resumed else stage_times)


def result_from_flags(name, flags):
  """The Result of AutoAttack version `name` as a report's flags hold it ("clean", name and
  "name/<stage>" for each stage run), for the checks of an evaluation that resumed after the
  version had finished; its times are unknown (0)."""
  # The stages' names and which are black-box depend on the version only, not on the classes,
  # epsilon or norm given here.
  stage_list = versions.stages(versions.ATTACK_NAMES[name], 10, epsilon=0.0, norm="linf")
  ran = [s for s in stage_list if f"{name}/{s.name}" in flags]
  return Result(name, [s.name for s in ran], [s.black_box for s in ran],
                np.asarray(flags["clean"], bool),
                np.stack([np.asarray(flags[f"{name}/{s.name}"], bool) for s in ran]), 0.0)


def discard_state(state_path):
  """Removes a finished evaluation's saved progress (its result is in the report)."""
  if state_path and jax.process_index() == 0 and os.path.exists(state_path):
    os.remove(state_path)
    try:
      os.rmdir(os.path.dirname(state_path))  # the state directory, once it holds nothing else
    except OSError:
      pass

"""The export command: a training workdir's checkpoint to PyTorch.

  python -m clead_jax.export --workdir runs/digits --out digits.pt [--checkpoint latest|best|STEP]

(console script: clead-export) writes FILE.pt, a dict readable by torch.load:
  state_dict       the backbone's weights, named as the module in torch_models.py (and as
                   RobustBench's class, where there is one: see torch_models.py);
  architecture     {'name': ..., arguments}: torch_models.build(architecture) makes the module;
  robustbench      how to build RobustBench's own class that this state_dict loads into with
                   strict=True, or null with the reason there is none;
  mean, std        the normalisation, which Normalized(module, mean, std) puts inside the model;
  projection_head  the contrastive head's weights (not part of the classifier), for the way back;
  clead_jax        the run's config, the checkpoint step and the dataset;
and FILE.py, a copy of clead_jax/torch_models.py (it imports only torch). Then it loads the two
files as below and compares the PyTorch model's logits and predictions with ours on the first
--check_examples test images (default 1000, 0 skips); logits that differ by more than 1e-4 of the
logit scale are a bug of the conversion: one line, exit code 1 (the files stay). Loading it:

  import torch, importlib.util
  checkpoint = torch.load("digits.pt", weights_only=False)
  spec = importlib.util.spec_from_file_location("torch_models", "digits.py")
  torch_models = importlib.util.module_from_spec(spec); spec.loader.exec_module(torch_models)
  backbone = torch_models.build(checkpoint["architecture"])
  backbone.load_state_dict(checkpoint["state_dict"], strict=True)
  model = torch_models.Normalized(backbone, checkpoint["mean"], checkpoint["std"]).eval()

The way back (a PyTorch checkpoint into our Flax module) is `evaluate --torch_checkpoint`; the
conversion both ways is clead_jax/torch_weights.py.
"""

import os
import sys

from absl import flags

from clead_jax import command_line
from clead_jax.errors import UserError


def _define_flags():
  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step.")
  flags.DEFINE_string("out", None, "The PyTorch file to write (FILE.pt; FILE.py is written too).")
  flags.DEFINE_integer("check_examples", 1000,
                       "Test images on which PyTorch's logits are compared with ours; 0 skips.")

# Logits of the export may differ from ours by float round-off only (as tests/test_torch.py checks).
_TOLERANCE = 1e-4


def main(argv):
  command_line.start(argv)
  command_line.require("workdir", "out")
  values = flags.FLAGS
  with command_line.user_errors_as_one_line():
    # pylint: disable=g-import-not-at-top
    import jax
    from clead_jax import input_pipeline
    from clead_jax import parallel
    from clead_jax import torch_weights
    from clead_jax import train_state
    from clead_jax.evaluation import workdir as workdir_lib
    if values.check_examples < 0:
      raise UserError(f"--check_examples={values.check_examples}: give a count >= 0 (0 skips "
                      "the comparison)")
    if not values.out.endswith(".pt"):
      raise UserError(f"--out={values.out}: name a .pt file (FILE.py is written beside it)")
    torch_weights.import_torch()
    config = workdir_lib.load_config(values.workdir)
    dataset = input_pipeline.load_dataset(config.data)
    model = train_state.build(config, dataset)
    state, step, _ = workdir_lib.restore_checkpoint(values.workdir, config, model,
                                                    parallel.make_mesh(), values.checkpoint)
    # The weights the run's report evaluates: the averaged ones when EMA is on (eval.weights).
    variables = jax.device_get(train_state.weights_of(state, train_state.evaluated_weights(config)))
    written = torch_weights.export_state(config, variables, step, dataset, values.out)
    rb = written["robustbench"]
    print(f"clead_jax.export: step {step} of {values.workdir} -> {values.out} and "
          f"{os.path.splitext(values.out)[0]}.py ({written['architecture']['name']}); "
          + (f"loads into RobustBench's {rb.get('class') or rb.get('factory')} with strict=True"
             if "none" not in rb else f"no RobustBench class: {rb['none']}"), flush=True)
    if values.check_examples:
      images = input_pipeline.to_float(dataset.test_images[:values.check_examples])
      check = torch_weights.compare_export(values.out, model.network, variables, images)
      relative = check["max_abs_diff"] / max(1.0, check["logit_scale"])
      line = (f"PyTorch and JAX agree on {check['same_predictions']} of {check['examples']} "
              f"test predictions; max |logit difference| {check['max_abs_diff']:.2e} "
              f"({relative:.1e} of the logit scale {check['logit_scale']:.3g})")
      if relative > _TOLERANCE:
        print(f"error: {line}: above {_TOLERANCE:g}, a bug of the conversion; please report it "
              "with the workdir's config", file=sys.stderr, flush=True)
        raise SystemExit(1)
      print(f"clead_jax.export: {line}", flush=True)


def run():
  command_line.run(main, _define_flags, __doc__)


if __name__ == "__main__":
  run()

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
and FILE.py, a copy of clead_jax/torch_models.py (it imports only torch). Loading it:

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

from absl import flags

from clead_jax import command_line
from clead_jax.errors import UserError


def _define_flags():
  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step.")
  flags.DEFINE_string("out", None, "The PyTorch file to write (FILE.pt; FILE.py is written too).")


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
    if not values.out.endswith(".pt"):
      raise UserError(f"--out={values.out}: name a .pt file (FILE.py is written beside it)")
    torch_weights.import_torch()
    config = workdir_lib.load_config(values.workdir)
    dataset = input_pipeline.load_dataset(config.data)
    model = train_state.build(config, dataset)
    state, step, _ = workdir_lib.restore_checkpoint(values.workdir, config, model,
                                                    parallel.make_mesh(), values.checkpoint)
    variables = jax.device_get(state.variables)
    written = torch_weights.export_state(config, variables, step, dataset, values.out)
    rb = written["robustbench"]
    print(f"clead_jax.export: step {step} of {values.workdir} -> {values.out} and "
          f"{os.path.splitext(values.out)[0]}.py ({written['architecture']['name']}); "
          + (f"loads into RobustBench's {rb.get('class') or rb.get('factory')} with strict=True"
             if "none" not in rb else f"no RobustBench class: {rb['none']}"), flush=True)


def run():
  command_line.run(main, _define_flags, __doc__)


if __name__ == "__main__":
  run()

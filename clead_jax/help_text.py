"""`--help` of every command: its usage, its flags, and (for commands that take --config) every
config field with its default and its one-line meaning, read from default_config.py's comments,
then the names the registries accept (methods, datasets, models, attacks).
"""

import inspect
import re
import textwrap

from clead_jax import config_tools
from clead_jax import default_config

_ABSL_FLAGS = {"v", "logtostderr", "alsologtostderr", "log_dir", "stderrthreshold",
               "showprefixforinfo", "log_fn", "logger_levels", "only_check_args", "pdb",
               "pdb_post_mortem", "run_with_pdb", "run_with_profiling", "profile_file",
               "use_cprofile_for_profiling", "help", "helpshort", "helpfull", "helpxml", "flagfile",
               "undefok", "?", "use_absl_log_file"}


def field_comments():
  """{'attack.epsilon': 'the comment beside or above its line', ...} from default_config.py."""
  comments, pending = {}, []
  for line in inspect.getsource(default_config).splitlines():
    stripped = line.strip()
    if stripped.startswith("#"):
      pending.append(stripped.lstrip("# ").strip())
      continue
    match = re.match(r"config\.([\w.]+)\s*=\s*(.*)$", stripped)
    if match and "ConfigDict()" not in match.group(2):
      _, _, trailing = match.group(2).partition("  # ")
      parts = pending + ([trailing.strip()] if trailing else [])
      comments[match.group(1)] = " ".join(parts)
    pending = []
  return comments


def _registries():
  # pylint: disable=g-import-not-at-top  (only --help needs them)
  from clead_jax import input_pipeline
  from clead_jax import methods
  from clead_jax import models
  from clead_jax.evaluation import suite
  return [("methods (config.method)", sorted(methods.METHODS)),
          ("datasets (config.data.name)", sorted(input_pipeline.DATASETS) + ["npz:DIR"]),
          ("models (config.model.name)", sorted(models.MODELS)),
          ("attacks (config.eval.attacks, evaluate --attacks)", list(suite.ATTACK_NAMES))]


_VERBOSITY = ("--verbosity=0 (or higher) shows library logging (absl, Orbax, TFDS) on the "
              "terminal too; without it, it goes to the workdir's clead_jax.log only")


def render(usage, flag_values, config_fields=True):
  """config_fields=False: a command whose --config is secondary (evaluate's, only with
  --torch_checkpoint) says where the fields apply instead of listing them."""
  lines = [usage.strip(), "", "Flags:"]
  takes_config = False
  for name in sorted(flag_values):
    flag = flag_values[name]
    if name in _ABSL_FLAGS or name.startswith("config.") or flag.name != name:
      continue
    takes_config |= name == "config"
    if name == "verbosity":
      lines.append(f"  --verbosity: {_VERBOSITY}")
      continue
    default = "" if flag.default is None else f" (default: {flag.default!r})"
    lines.append(f"  --{name}: {flag.help}{default}")
  if takes_config and not config_fields:
    lines += ["", "--config.FIELD=VALUE overrides go with --config FILE only; every field and its "
                  "meaning: python -m clead_jax.main --help"]
  elif takes_config:
    lines += ["", "Config fields (--config.FIELD=VALUE; defaults of clead_jax/default_config.py, "
                  "which a config file may change):"]
    comments = field_comments()
    for field, value in config_tools.flatten(default_config.get_base_config().to_dict()).items():
      meaning = comments.get(field, "")
      lines.append(f"  {field} = {value!r}" + (f"  # {meaning}" if meaning else ""))
  lines.append("")
  for title, names in _registries():
    lines += textwrap.wrap(f"{title}: {', '.join(names)}", 100, subsequent_indent="    ")
  return "\n".join(lines) + "\n"

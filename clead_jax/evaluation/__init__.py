"""Robust evaluation, sharded over every device of every process.

  sharded.py            the one loop: a per-example function mapped over examples of a split;
  suite.py              Evaluator and evaluate(): clean, each attack, AutoAttack, transfer, curve;
  autoattack_runner.py  AutoAttack stage by stage on the points still robust, resumable;
  checks.py             warnings that flag a suspect evaluation (gradient masking, ...);
  workdir.py            a training workdir's config, checkpoint and accumulating report.
"""

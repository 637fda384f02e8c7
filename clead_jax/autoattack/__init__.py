"""AutoAttack in JAX: APGD, FAB, Square, their composition, and checks on an evaluation.

  apgd.apgd, fab.fab, square.square: the attacks, attack(apply_fn, variables, x, y, key, ...).
  autoattack.autoattack: a version (standard, plus, rand) as one jittable attack.
  autoattack.Runner: a version over a whole split, per-stage, on the points still robust.
  checks: warnings that flag a suspect evaluation.
"""

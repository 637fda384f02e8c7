"""AutoAttack in JAX: the attacks and their composition (Croce & Hein 2020).

  apgd.apgd, fab.fab, square.square: the attacks, attack(apply_fn, variables, x, y, key, ...).
  versions: the versions (standard, plus, rand) as stages, and as one jittable attack.
  common: what only these attacks share (random directions, targets, the restart loop).
Running a version over a split (stage by stage, resumable) is evaluation/autoattack_runner.py.
"""

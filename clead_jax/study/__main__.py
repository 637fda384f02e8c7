"""python -m clead_jax.study: see clead_jax/study/command.py."""

from clead_jax.study import command

command.run()

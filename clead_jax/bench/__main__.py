"""python -m clead_jax.bench: see clead_jax/bench/cli.py."""

from clead_jax.bench import cli

cli.run()

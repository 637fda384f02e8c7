"""Benchmarks of the C-LEAD train step and the evaluation attacks, against a PyTorch reference.

  python -m clead_jax.bench train_step --model resnet18 --width 64 --batch 128 --compare torch

PyTorch is an optional extra (pip install clead_jax[bench]); only this package imports it, and
only when asked to compare.
"""

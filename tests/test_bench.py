"""The benchmark command and what it relies on: the CPU convolution's gradients against lax's,
the FLOP count against a closed form, the PyTorch reference against the JAX model and loss, and
one tiny run of the command with --json."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from clead_jax import losses
from clead_jax import models
from clead_jax.bench import cli
from clead_jax.bench import measure
from clead_jax.bench import workloads

_NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("size,kernel,stride,padding,dtype", [
    (8, 3, 1, "SAME", jnp.float32), (9, 3, 2, "SAME", jnp.float32), (8, 1, 2, "SAME", jnp.float32),
    (9, 3, 1, "VALID", jnp.float32), (11, 3, 2, "VALID", jnp.float32), (7, 5, 3, 2, jnp.float32),
    (8, 3, 2, 1, jnp.bfloat16)])
def test_conv2d_gradients_match_lax(size, kernel, stride, padding, dtype):
  x = jax.random.normal(jax.random.key(0), (6, size, size, 3), dtype)
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 5), dtype)
  if isinstance(padding, str):
    pads = lax.padtype_to_pads((size, size), (kernel, kernel), (stride, stride), padding)
  else:
    pads = ((padding, padding),) * 2
  pads = tuple(tuple(int(p) for p in pad) for pad in pads)
  reference = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), pads,
                                                    dimension_numbers=_NHWC)
  ours = lambda x, w: models.conv2d(x, w, (stride, stride), pads)
  y, reference_vjp = jax.vjp(reference, x, w)
  cotangent = jax.random.normal(jax.random.key(2), y.shape, dtype)
  tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(ours(x, w).astype(np.float32), y.astype(np.float32), rtol=tolerance,
                             atol=tolerance)
  for got, want in zip(jax.vjp(ours, x, w)[1](cotangent), reference_vjp(cotangent)):
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    np.testing.assert_allclose(got.astype(np.float32) / scale, want.astype(np.float32) / scale,
                               atol=tolerance)


def test_conv_has_flax_conv_parameters():
  x = jnp.ones((2, 8, 8, 3))
  ours = models.Conv(4, (3, 3), (2, 2), padding=1).init(jax.random.key(0), x)
  flax_conv = nn.Conv(4, (3, 3), (2, 2), padding=1).init(jax.random.key(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(flax_conv)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_conv)):
    np.testing.assert_array_equal(a, b)


def test_input_gradient_in_a_loop_has_canonical_convolutions():
  """Inside a fori_loop, every convolution is NHWC x HWIO, the form XLA:CPU runs fast."""
  w = jnp.full((3, 3, 4, 4), 0.1)
  loss = lambda x: jnp.sum(jnp.tanh(models.conv2d(x, w, (2, 2), ((1, 1), (1, 1)))))
  attack = lambda x: lax.fori_loop(0, 3, lambda _, x: x + jnp.sign(jax.grad(loss)(x)), x)
  hlo = jax.jit(attack).lower(jnp.ones((2, 8, 8, 4))).compile().as_text()
  labels = {line.split("dim_labels=")[1].split(",")[0] for line in hlo.splitlines()
            if "convolution(" in line}
  assert labels == {"b01f_01io->b01f"}, labels


def test_count_flops_multiplies_loops_by_their_trip_count():
  w = jnp.ones((3, 3, 4, 8))
  conv = lambda x: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC)
  x = jnp.ones((2, 5, 5, 4))
  one = 2 * 2 * 5 * 5 * 8 * 3 * 3 * 4
  assert measure.count_flops(conv, x) == one
  assert measure.count_flops(lambda x: lax.fori_loop(0, 7, lambda _, x: x + conv(x)[..., :4], x),
                             x) == 7 * one
  # The forward pass is dead in an input gradient of a linear map: only one convolution remains.
  assert measure.count_flops(jax.grad(lambda x: jnp.sum(conv(x))), x) == one


def test_torch_reference_matches_the_model_and_the_loss():
  torch = pytest.importorskip("torch")
  from clead_jax.bench import torch_reference  # pylint: disable=g-import-not-at-top
  config = workloads.load_config(overrides={"model.width": 4})
  network = models.build_network(config.model, 10, workloads.CIFAR10_MEAN, workloads.CIFAR10_STD)
  variables = network.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
  jax_shapes = sorted(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
  torch_model = torch_reference.ResNet18(4, 10, config.model.projection_dim)
  torch_shapes = sorted(p.numel() for p in torch_model.parameters())
  assert torch_shapes == jax_shapes

  rng = np.random.default_rng(0)
  z_clean, z_adv = (rng.normal(size=(8, 16)).astype(np.float32) for _ in range(2))
  z_clean /= np.linalg.norm(z_clean, axis=1, keepdims=True)
  z_adv /= np.linalg.norm(z_adv, axis=1, keepdims=True)
  labels = np.array([0, 1, 1, 2, 0, 3, 3, 3], np.int32)
  want = losses.info_nce(z_clean, z_adv, labels, 0.1, "pair")
  got = torch_reference.info_nce_pair(torch.from_numpy(z_clean), torch.from_numpy(z_adv),
                                      torch.from_numpy(labels).long(), 0.1)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)

  x = torch.rand(4, 3, 32, 32)
  y = torch.zeros(4, dtype=torch.long)
  x_adv = torch_reference.pgd(torch_model.eval(), x, y, epsilon=8 / 255, step_size=2 / 255,
                              steps=2)
  assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
  assert torch_reference.augment(x).shape == x.shape


def test_train_step_command_writes_the_json(tmp_path):
  out = tmp_path / "bench.json"
  compare = []
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    compare = ["--compare", "torch"]
  except ImportError:
    pass
  cli.main(["train_step", "--model", "resnet18", "--width", "2", "--batch", "4",
            "--pgd-steps", "1", "--runs", "1", "--warmup", "0", "--json", str(out), *compare])
  result = json.loads(out.read_text())
  assert set(cli.JSON_KEYS) <= set(result)
  assert result["jax_images_per_s"] > 0 and result["jax_compile_s"] > 0
  assert result["flops_per_image"] > 0 and 0 < result["achieved_flops"] < 10 * result["peak_flops"]
  if compare:
    assert result["torch_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["jax_images_per_s"] /
                                            result["torch_images_per_s"])


def _torch_reference_weights(config, variables):
  """Our ResNet-18's variables as the bench reference's state_dict (its block and head names)."""
  from clead_jax import torch_weights  # pylint: disable=g-import-not-at-top
  state, head = torch_weights.to_torch(config.model, variables)
  renamed = {}
  for key, value in state.items():
    if key.startswith("layer"):
      stage, index, rest = key[len("layer"):].split(".", 2)
      key = f"blocks.{2 * (int(stage) - 1) + int(index)}.{rest}"
    renamed[key] = value
  for layer, torch_layer in (("Dense_0", "head.0"), ("Dense_1", "head.2")):
    renamed[f"{torch_layer}.weight"] = head[f"{layer}.kernel"].T
    renamed[f"{torch_layer}.bias"] = head[f"{layer}.bias"]
  return renamed


@pytest.mark.parametrize("reference", ["torch", "torch_compile"])
def test_the_torch_references_compute_our_clead_loss(reference):
  """Same weights, same clean and adversarial batch: our C-LEAD loss (methods.clead_loss, one
  joint train-mode pass) and the reference's, eager with channels_last and under torch.compile
  (backend aot_eager here: Dynamo and AOTAutograd's graphs without a C++ toolchain)."""
  torch = pytest.importorskip("torch")
  from clead_jax import methods  # pylint: disable=g-import-not-at-top
  config = workloads.load_config(overrides={"model.width": 4, "method": "clead",
                                            "data.augment": False})
  network = models.build_network(config.model, 10, workloads.CIFAR10_MEAN, workloads.CIFAR10_STD)
  variables = jax.device_get(network.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3))))
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
  x_adv = np.clip(x + rng.uniform(-0.03, 0.03, x.shape), 0, 1).astype(np.float32)
  y = rng.integers(0, 10, 8).astype(np.int32)
  ours, _ = methods.clead_loss(methods.Context(network, config), variables["params"],
                               variables["batch_stats"], jnp.asarray(x), jnp.asarray(x_adv),
                               jnp.asarray(y))
  step = workloads.torch_clead_step(config, compiled=reference == "torch_compile",
                                    compile_backend="aot_eager")
  loaded = step.module.load_state_dict(
      {k: torch.as_tensor(np.asarray(v))
       for k, v in _torch_reference_weights(config, variables).items()}, strict=False)
  assert set(loaded.missing_keys) == {"mean", "std"} and not loaded.unexpected_keys
  nchw = lambda a: torch.as_tensor(a).permute(0, 3, 1, 2).contiguous()
  theirs = step.loss(nchw(x), nchw(x_adv), torch.as_tensor(y).long())
  np.testing.assert_allclose(float(theirs), float(ours), rtol=1e-4)


def test_bench_table_lists_every_kind_of_row(tmp_path):
  """`bench table` over the compare suite's files: a step row with both PyTorch references, the
  AutoAttack comparison, the loop's rate, and a skipped row named as such."""
  import json  # pylint: disable=g-import-not-at-top
  step = {"workload": "clead pgd10 resnet18 w64 b512 bfloat16", "jax_images_per_s": 300.0,
          "torch_images_per_s": 150.0, "ratio": 2.0, "torch_compile_images_per_s": 250.0,
          "ratio_vs_torch_compile": 1.2, "jax_compile_s": 20.0, "flops_per_image": 3.3e10,
          "achieved_flops": 1e13, "peak_flops": 4e13}
  autoattack = {"workload": "autoattack resnet18 n1000", "ratio": 3.0,
                "ours": {"time_s": 10.0, "robust_accuracy": 0.25,
                         "stages": {"apgd_ce": {"accuracy_after": 0.4, "time_s": 4.0}}},
                "reference": {"time_s": 30.0, "robust_accuracy": 0.25, "stages": {}}}
  loop = {"loop_images_per_s": 280.0, "model": "resnet18", "batch": 128, "dtype": "float32",
          "data": "cifar10 (SYNTHETIC)"}
  paths = []
  for name, result in (("step", step), ("aa", autoattack), ("loop", loop),
                       ("late", {"skipped": "time budget"})):
    paths.append(str(tmp_path / f"{name}.json"))
    with open(paths[-1], "w") as f:
      json.dump(result, f)
  text = cli.table(paths)
  assert ("| clead pgd10 resnet18 w64 b512 bfloat16 | 300.00 | 150.00 | 2.00x | 250.00 | 1.20x | "
          "20.0 | 33.00 | 25% |") in text
  assert "ours 10.0 s (robust 0.250; apgd_ce 0.400 in 4.0 s); reference 30.0 s" in text
  assert "the training loop at 280.0 img/s (resnet18 b128 float32" in text
  assert "- late: skipped (time budget)" in text

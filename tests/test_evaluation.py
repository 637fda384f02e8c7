"""The evaluation suite's definitions: what counts as robust, and the precision attacks run in."""

import jax
import jax.numpy as jnp
import numpy as np

from clead_jax import attacks
from clead_jax import input_pipeline
from clead_jax import parallel
from clead_jax import train_state
from clead_jax.evaluation import suite
from tests.conftest import digits_config

EPSILON = 0.1
OMEGA = np.pi / EPSILON  # a step of exactly epsilon flips the sign of sin(OMEGA x)


class _Oscillating:
  """Two classes, logits (s, -s) with s = sin(OMEGA * x) on a single pixel: any step of
  epsilon flips the prediction, so FGSM turns every misclassified point into a correct one."""

  def apply(self, variables, x, train=False):
    del variables, train
    s = jnp.sin(OMEGA * x.reshape(x.shape[0], -1)[:, :1])
    return jnp.concatenate([s, -s], -1), s


def test_a_point_misclassified_clean_is_never_robust():
  """Robust = correct clean and after the attack, for every attack; here FGSM alone would leave
  every clean-misclassified point 'correct', and none of them may count."""
  x = np.linspace(0.3, 0.7, 101, dtype=np.float32)[:, None]
  y = np.zeros(len(x), np.int32)
  model = _Oscillating()
  clean_ok = np.asarray(jnp.argmax(model.apply(None, jnp.asarray(x))[0], -1)) == y
  x_adv = attacks.EVAL_ATTACKS["fgsm"](model.apply, None, jnp.asarray(x), jnp.asarray(y),
                                       jax.random.key(0), epsilon=EPSILON, norm="linf")
  after_ok = np.asarray(jnp.argmax(model.apply(None, x_adv)[0], -1)) == y
  assert 0.3 < clean_ok.mean() < 0.7 and np.all(after_ok[~clean_ok])  # the case under test
  evaluator = suite.Evaluator(model, parallel.make_mesh(), "linf", 64, seed=0)
  correct = evaluator.correct(None, x, y, "fgsm", EPSILON)
  np.testing.assert_array_equal(correct, clean_ok & after_ok)
  assert not correct[~clean_ok].any()
  report = suite.evaluate(evaluator, None, x, y, epsilon=EPSILON, attack_names=["fgsm", "pgd20"])
  assert report["robust_accuracy"]["fgsm"] <= report["clean_accuracy"]
  assert report["robust_accuracy"]["pgd20"] <= report["clean_accuracy"]


def test_attacks_of_a_bfloat16_model_run_in_float32():
  """model.dtype=bfloat16 trains in bf16, but evaluation (attack gradients included) runs the
  same parameters in float32: no bf16 value in the compiled evaluation."""
  config = digits_config(**{"model.dtype": "bfloat16"})
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  abstract = jax.eval_shape(lambda: train_state.create_train_state(
      model.network, model.tx, dataset.image_shape, 0))
  variables = {"params": abstract.params, "batch_stats": abstract.batch_stats}
  images = jax.ShapeDtypeStruct((8,) + tuple(dataset.image_shape), dataset.test_images.dtype)
  labels = jax.ShapeDtypeStruct((8,), jnp.int32)
  train_jaxpr = str(jax.make_jaxpr(lambda v, x: model.network.apply(v, x, train=False))(
      variables, jax.ShapeDtypeStruct(images.shape, jnp.float32)))
  assert "bf16" in train_jaxpr  # the model under test does compute in bf16
  evaluator = suite.Evaluator(model.network, parallel.make_mesh(), "linf", 8, seed=0)
  fn = evaluator._correct_fn("pgd20")  # pylint: disable=protected-access
  jaxpr = str(jax.make_jaxpr(fn)(variables, images, labels, labels, jnp.float32(0.1)))
  assert "bf16" not in jaxpr


"""The train state and the pure per-step functions of Mixer training.

Pure functions of explicit inputs: `compiled.py` jits them over any mesh.
"""

from typing import Any, Callable, Optional

from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from mixer_jax import models


class TrainState(train_state.TrainState):
  """Flax TrainState plus the run's base rng and the parameters' EMA.

  The rng never changes: step t uses `fold_in(rng, t)`, so a resumed run
  draws exactly the random numbers an uninterrupted one would. `ema_params`
  is None when config.ema_decay is 0 (checkpoints then hold no EMA).
  """
  rng: jax.Array
  ema_params: Any = None


def create_train_state(model: models.MlpMixer, tx: optax.GradientTransformation,
                       rng: jax.Array, image_size: int, *,
                       ema: bool = False) -> TrainState:
  """Initialises parameters, optimizer state, step 0 and the run's rng.

  The EMA starts from the initial parameters (as timm's ModelEma). The step
  is a strong int32, so the jitted step compiles once.
  """
  params_rng, dropout_rng = jax.random.split(rng)
  params = models.init_params(model, params_rng, image_size)
  state = TrainState.create(
      apply_fn=model.apply, params=params, tx=tx, rng=dropout_rng,
      ema_params=jax.tree.map(jnp.copy, params) if ema else None)
  return state.replace(step=jnp.zeros((), jnp.int32))


def per_example_loss(logits: jax.Array, labels: jax.Array, loss: str,
                     label_smoothing: float = 0.0) -> jax.Array:
  """(batch,) float32 cross-entropies of (batch, classes) targets.

  'sigmoid' sums the binary losses over classes (big_vision's sigmoid_xent).
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  if loss == 'softmax':
    return optax.softmax_cross_entropy(logits, labels)
  return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)


def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, *,
          alpha: float, prob: float):
  """big_vision's mixup (`utils.get_mixup`), one weight for the global batch.

  With probability `prob`, x[i] <- a x[i] + (1 - a) x[i - 1] (labels too)
  with a = max(b, 1 - b), b ~ Beta(alpha, alpha) drawn once from the step's
  key: every device uses the same a, and the roll sends one example across
  each device boundary, so the result does not depend on the device count.
  """
  lam_rng, apply_rng = jax.random.split(rng)
  lam = jax.random.beta(lam_rng, alpha, alpha)
  lam = jnp.where(jax.random.bernoulli(apply_rng, prob),
                  jnp.maximum(lam, 1.0 - lam), 1.0)

  def mix(x):
    return (lam * x + (1.0 - lam) * jnp.roll(x, 1, axis=0)).astype(x.dtype)
  return mix(images), mix(labels)


def _in_top_k(logits, labels, k: int = 1):
  """1.0 where the label (argmax of `labels`) is among the top k logits.

  Classes rank as `jnp.argmax` ranks them, big_vision's top-1 rule: a
  higher logit first, a tie to the lower index, a NaN above every number
  and the first NaN above the others. At k = 1 this is exactly
  argmax(logits) == label. Counting the classes ranked above the label
  keeps the batch sharded; `lax.top_k` would make XLA gather the logits.
  """
  logits = logits.astype(jnp.float32)
  label_index = jnp.argmax(labels, -1)[:, None]
  label = jnp.arange(logits.shape[-1]) == label_index
  lower = jnp.arange(logits.shape[-1]) < label_index
  # where, not a product with the one-hot: inf * 0 would be NaN.
  label_logit = jnp.sum(jnp.where(label, logits, 0.0), axis=-1, keepdims=True)
  nan = jnp.isnan(logits)
  above = jnp.where(jnp.isnan(label_logit), nan & lower,
                    nan | (logits > label_logit) |
                    ((logits == label_logit) & lower))
  return (jnp.sum(above, axis=-1) < k).astype(jnp.float32)


def nan_rows(logits, mask):
  """How many real (mask 1) examples have a NaN among their logits."""
  return jnp.sum(jnp.any(jnp.isnan(logits), axis=-1) * mask)


def train_step(state: TrainState, batch, *, loss: str = 'softmax',
               label_smoothing: float = 0.0, grad_accum_steps: int = 1,
               mixup_alpha: float = 0.0, mixup_prob: float = 0.0,
               learning_rate_fn: Optional[Callable[[Any], Any]] = None,
               ema_decay: float = 0.0):
  """One optimizer update on a global batch, optionally in micro-batches.

  With grad_accum_steps = k the batch is split into k equal micro-batches
  whose gradients are averaged by a `lax.scan`, so memory is that of one
  micro-batch and the update equals a single step on the whole batch (the
  mean loss of equal-sized parts is the mean over the whole). Micro-batch j
  takes examples j, j + k, j + 2k, ...: with the batch sharded in contiguous
  blocks, every micro-batch then still spans all devices.

  Returns (state, metrics): loss, accuracy (top-1 against the argmax of the
  targets), grad_norm and, with `learning_rate_fn`, learning_rate.
  """
  rng, mixup_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))

  def loss_fn(params, images, labels, key):
    logits = state.apply_fn({'params': params}, images, train=True,
                            rngs={'dropout': key})
    losses = per_example_loss(logits, labels, loss, label_smoothing)
    return losses.mean(), _in_top_k(logits, labels).mean()

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  images, labels = batch['image'], batch['label']
  if mixup_alpha > 0 and mixup_prob > 0:
    images, labels = mixup(mixup_rng, images, labels, alpha=mixup_alpha,
                           prob=mixup_prob)
  k = grad_accum_steps
  if k == 1:
    (loss_value, accuracy), grads = grad_fn(state.params, images, labels, rng)
  else:
    def split(x):  # config validation: k divides the batch.
      x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
      return jnp.swapaxes(x, 0, 1)

    def accumulate(carry, inputs):
      index, micro_images, micro_labels = inputs
      (value, acc), grad = grad_fn(state.params, micro_images, micro_labels,
                                   jax.random.fold_in(rng, index))
      sums = jax.tree.map(jnp.add, carry, (grad, value, acc))
      return sums, None

    zeros = (jax.tree.map(jnp.zeros_like, state.params),
             jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, loss_value, accuracy), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(k), split(images), split(labels)))
    grads, loss_value, accuracy = jax.tree.map(
        lambda x: x / k, (grads, loss_value, accuracy))
  metrics = {'loss': loss_value, 'accuracy': accuracy,
             'grad_norm': optax.global_norm(grads)}
  if learning_rate_fn is not None:
    metrics['learning_rate'] = learning_rate_fn(state.step)
  new_state = state.apply_gradients(grads=grads)
  if state.ema_params is not None:
    new_state = new_state.replace(ema_params=optax.incremental_update(
        new_state.params, state.ema_params, step_size=1.0 - ema_decay))
  return new_state, metrics


def eval_step(params, batch, *, apply_fn: Callable[..., Any],
              loss: str = 'softmax', top_k: int = 5):
  """Masked sums of top-1 and top-k hits, loss, examples and NaN rows."""
  # Plain masked sums, not clu.metrics: clu has no top-k metric, and a dict
  # of sums merges over batches (and devices) with one tree add.
  logits = apply_fn({'params': params}, batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  hit_k = _in_top_k(logits, batch['label'], top_k)
  losses = per_example_loss(logits, batch['label'], loss)
  return {'correct': jnp.sum(_in_top_k(logits, batch['label']) * mask),
          'top5': jnp.sum(hit_k * mask),
          'loss_sum': jnp.sum(losses * mask),
          'count': jnp.sum(mask), 'nan_rows': nan_rows(logits, mask)}

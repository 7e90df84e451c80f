"""Optimizer, learning-rate schedule and weight-decay mask from a config.

The update follows big_vision's convention, which the paper's numbers assume:

  update = -shape(t) * (learning_rate * opt(clip(g)) + weight_decay * param)

where `shape(t)` is big_vision's `create_learning_rate_schedule` with base 1
(linear warmup from 0, then linear or cosine decay towards the relative end
`end_learning_rate_multiplier`, reached at update `num_train_steps`, one past
the last), `opt` is Adam's or SGD-momentum's direction and the weight-decay
term applies to kernels only. The decay is therefore decoupled from the
learning rate (it is not multiplied by it, unlike `optax.adamw`) but follows
the schedule's shape, so big_vision's `wd=1e-4` is our `weight_decay=1e-4`.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax


Schedule = Callable[[jax.Array], jax.Array]


def schedule_shape(config, num_train_steps: int) -> Schedule:
  """t -> multiplier of the peak learning rate at update t (from 0).

  big_vision's `create_learning_rate_schedule(base=1)` (vit_jax's too):
    warmup(t) = min(1, t / warmup_steps)        (1 when warmup_steps = 0)
    p = clip((t - warmup_steps) / (T - warmup_steps), 0, 1)
    linear: end + (1 - end) * (1 - p)
    cosine: end + (1 - end) * (1 + cos(pi p)) / 2
  times warmup(t), with end = config.end_learning_rate_multiplier
  (big_vision's `linear_end`) and T = num_train_steps: the end value is
  reached at t = T, one past the last update.
  """
  warmup = int(config.warmup_steps)
  end = float(config.end_learning_rate_multiplier)
  decay_steps = float(max(num_train_steps - warmup, 1))
  cosine = config.lr_schedule == 'cosine'

  # Written out rather than joined from optax's schedules: the same formula,
  # but computed as the reference does (optax's linear warmup is 1 - (1 -
  # t/w), which loses ~1e-4 relative precision in float32 at t = 1).
  def multiplier(count):
    t = jnp.asarray(count, jnp.float32)
    progress = jnp.clip((t - warmup) / decay_steps, 0.0, 1.0)
    if cosine:
      decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      decay = 1.0 - progress
    value = end + (1.0 - end) * decay
    if warmup:
      value = value * jnp.minimum(1.0, t / warmup)
    return value

  return multiplier


def learning_rate_fn(config, num_train_steps: int) -> Schedule:
  """Returns t -> learning rate of update t (peak times `schedule_shape`)."""
  shape = schedule_shape(config, num_train_steps)
  return lambda count: config.learning_rate * shape(count)


def kernel_mask(params):
  """True for leaves named `kernel` (Dense and stem weights), else False.

  Biases and LayerNorm scales are not decayed, as in big_vision's default
  `wd_mults=[('.*/kernel$', 1.0)]`.
  """
  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, 'key', getattr(last, 'name', None)) == 'kernel'
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def create_optimizer(config,
                     num_train_steps: int) -> optax.GradientTransformation:
  """The optax chain of the module docstring (updates carry the minus)."""
  momentum_dtype = jnp.dtype(config.momentum_dtype)
  chain = []
  if config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == 'adam':
    chain.append(optax.scale_by_adam(b1=config.b1, b2=config.b2,
                                     mu_dtype=momentum_dtype))
  else:
    chain.append(optax.trace(decay=config.b1, accumulator_dtype=momentum_dtype))
  chain.append(optax.scale(config.learning_rate))
  if config.weight_decay > 0:
    chain.append(optax.add_decayed_weights(config.weight_decay,
                                           mask=kernel_mask))
  chain.append(optax.scale_by_schedule(schedule_shape(config, num_train_steps)))
  chain.append(optax.scale(-1.0))
  return optax.chain(*chain)

"""Optimizer, learning-rate schedule and weight-decay mask from a config.

The update follows big_vision's convention, which the paper's numbers assume:

  update = -shape(t) * (learning_rate * opt(clip(g)) + weight_decay * param)

where `shape(t)` is the schedule normalised to a peak of 1 (linear warmup from
0, then linear or cosine decay to end_learning_rate / learning_rate at the
last step), `opt` is Adam's or SGD-momentum's direction and the weight-decay
term applies to kernels only. The decay is therefore decoupled from the
learning rate (it is not multiplied by it, unlike `optax.adamw`) but follows
the schedule's shape, so big_vision's `wd=1e-4` is our `weight_decay=1e-4`.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mixer_jax.training import config_validation



Schedule = Callable[[jax.Array], jax.Array]


def schedule_shape(config, num_train_steps: int) -> Schedule:
  """Returns t -> multiplier of the peak learning rate at update `t`.

  Update t (0-based, as optax counts) uses:
    t < warmup_steps:  t / warmup_steps                (0 at the first update)
    otherwise:         end + (1 - end) * decay(p),
                       p = (t - warmup_steps) / (T - 1 - warmup_steps)
  with end = end_learning_rate / learning_rate, decay(p) = 1 - p (linear) or
  (1 + cos(pi p)) / 2 (cosine), p clipped to [0, 1] and T = num_train_steps.
  So the last update, t = T - 1, uses exactly end_learning_rate.

  Args:
    config: the training config (learning_rate, end_learning_rate,
      warmup_steps, lr_schedule).
    num_train_steps: total number of optimizer updates.

  Returns:
    A jittable function of the update count.
  """
  if config.lr_schedule not in config_validation.SCHEDULES:
    raise ValueError(f'config.lr_schedule={config.lr_schedule!r} is not one '
                     f'of {config_validation.SCHEDULES}.')
  warmup = int(config.warmup_steps)
  end = float(config.end_learning_rate) / float(config.learning_rate)
  decay_steps = max(num_train_steps - 1 - warmup, 1)
  if config.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(1.0, decay_steps, alpha=end)
  else:
    decay = optax.linear_schedule(1.0, end, decay_steps)
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, 1.0, warmup), decay], [warmup])


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
  """Builds the optax chain described in the module docstring.

  Args:
    config: training config with optimizer, learning_rate, lr_schedule,
      warmup_steps, end_learning_rate, b1, b2, momentum_dtype, weight_decay
      and grad_clip_norm.
    num_train_steps: total number of optimizer updates (sets the schedule).

  Returns:
    An `optax.GradientTransformation`; apply the updates with
    `optax.apply_updates` (they already carry the minus sign).
  """
  if config.optimizer not in config_validation.OPTIMIZERS:
    raise ValueError(f'config.optimizer={config.optimizer!r} is not one of '
                     f'{config_validation.OPTIMIZERS}.')
  if config.momentum_dtype not in config_validation.DTYPES:
    raise ValueError(f'config.momentum_dtype={config.momentum_dtype!r} is not '
                     f'one of {config_validation.DTYPES}.')
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

"""Every jitted function of a run, built in one place: `build`.

Each is jitted with the same parameter shardings, so a function never meets
parameters placed for another one (docs/parallelism.md).
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from mixer_jax import models
from mixer_jax.training import optim
from mixer_jax.training import sharding
from mixer_jax.training import train_steps


def forward(model) -> Callable[..., jax.Array]:
  """f(params, images in [-1, 1]) -> float32 logits (features if no head)."""
  def apply(params, images):
    return model.apply({'params': params}, images,
                       train=False).astype(jnp.float32)
  return apply


def predict_function(model) -> Callable[..., jax.Array]:
  """Jitted (params, images) -> probabilities, on one device (any count)."""
  apply = forward(model)
  return jax.jit(lambda p, x: jax.nn.softmax(apply(p, x), axis=-1))


def real_sums(params, batch, *, apply_fn) -> Dict[str, jax.Array]:
  """Masked ReaL hits (top-1 in the label set), counts and NaN rows."""
  logits = apply_fn({'params': params}, batch['image'], train=False)
  top1 = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1])
  # A masked sum, not take_along_axis (a gather XLA would split all-to-all).
  hit = jnp.sum(batch['label'] * top1, axis=-1)
  mask = batch['mask'].astype(jnp.float32)
  return {'correct': jnp.sum(hit * mask), 'count': jnp.sum(mask),
          'nan_rows': train_steps.nan_rows(logits, mask)}


def without_head(tree):
  """The parameter (or sharding) tree of the feature model: no 'head'."""
  return {k: v for k, v in tree.items() if k != 'head'}


def features_function(features_model, mesh, params_sharding):
  """Jitted (params, images) -> pre-logits, split over the batch like images.

  Images only (labels stay on the host), so one compilation serves every
  few-shot data set whatever its class count.
  """
  data = sharding.batch_sharding(mesh)
  return jax.jit(forward(features_model), in_shardings=(params_sharding, data),
                 out_shardings=data)


@dataclasses.dataclass(frozen=True)
class RunFunctions:
  """The jitted functions of one run; the state's are None without tx."""
  mesh: Any
  model: models.MlpMixer
  params_sharding: Any
  abstract_params: Any
  abstract_state: Optional[Any]  # The restore target.
  init_fn: Optional[Callable[..., Any]]
  train_step: Optional[Callable[..., Any]]  # Donates the state.
  eval_step: Callable[..., Any]  # Also config.evals' classification.
  real_step: Callable[..., Any]
  features_step: Callable[..., Any]  # (headless params, images).
  serve_step: Callable[..., Any]


def _with_shardings(shapes, shardings):
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)


def build(config, model, mesh, *,
          tx: Optional[optax.GradientTransformation] = None,
          num_train_steps: Optional[int] = None) -> RunFunctions:
  """Jits every function of a run over `mesh` (no state ones without `tx`).
  """
  replicated = sharding.replicated(mesh)
  data = sharding.batch_sharding(mesh)
  min_size = dict(min_size_mb=config.fsdp_min_size_mb)
  param_shapes = models.param_shapes(model, config.image_size)
  params_sharding = sharding.state_shardings(param_shapes, mesh,
                                             config.sharding, **min_size)
  abstract_state = init_fn = train_step = None
  if tx is not None:
    init = functools.partial(train_steps.create_train_state, model, tx,
                             image_size=config.image_size,
                             ema=config.ema_decay > 0)
    state_shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_sharding = sharding.state_shardings(state_shapes, mesh,
                                              config.sharding, **min_size)
    # The state's params (and their EMA) placed as the params alone.
    state_sharding = state_sharding.replace(
        params=params_sharding,
        ema_params=params_sharding if config.ema_decay > 0 else None)
    abstract_state = _with_shardings(state_shapes, state_sharding)
    init_fn = jax.jit(init, out_shardings=state_sharding)
    step = functools.partial(
        train_steps.train_step, loss=config.loss,
        label_smoothing=config.label_smoothing,
        grad_accum_steps=config.grad_accum_steps,
        mixup_alpha=config.pp.mixup_alpha, mixup_prob=config.pp.mixup_prob,
        learning_rate_fn=optim.learning_rate_fn(config, num_train_steps),
        ema_decay=config.ema_decay)
    train_step = jax.jit(step, in_shardings=(state_sharding, data),
                         out_shardings=(state_sharding, replicated),
                         donate_argnums=(0,))
  eval_step = jax.jit(
      functools.partial(train_steps.eval_step, apply_fn=model.apply,
                        loss=config.loss),
      in_shardings=(params_sharding, data), out_shardings=replicated)
  real_step = jax.jit(functools.partial(real_sums, apply_fn=model.apply),
                      in_shardings=(params_sharding, data),
                      out_shardings=replicated)
  features_step = features_function(model.clone(num_classes=None), mesh,
                                    without_head(params_sharding))
  serve_step = jax.jit(forward(model), in_shardings=(params_sharding, data),
                       out_shardings=data)
  return RunFunctions(
      mesh=mesh, model=model, params_sharding=params_sharding,
      abstract_params=_with_shardings(param_shapes, params_sharding),
      abstract_state=abstract_state, init_fn=init_fn, train_step=train_step,
      eval_step=eval_step, real_step=real_step, features_step=features_step,
      serve_step=serve_step)

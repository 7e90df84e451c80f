"""Tests of the launch check (`python -m mixer_jax.train --check_only`).

Every shipped config (`quickstart`, `b16`, `mixer_i1k.py:V` for each paper
variant, `finetune_cifar10`, `finetune_cifar100`) is resolved through the
`file.py[:ARG]` loader the programs use and planned on 8 fake devices under
`replicate` and `fsdp`. The default suite shrinks widths and image sizes
and compiles a representative set; the full sizes compile in a slow test.
"""

import os
import runpy
import subprocess
import sys

import jax
import pytest

from mixer_jax import models
from mixer_jax.training import launch_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ('S_32', 'S_16', 'S_8', 'B_32', 'B_16', 'L_32', 'L_16', 'H_14')
SHIPPED = (['configs/quickstart.py', 'configs/b16.py',
            'configs/finetune_cifar10.py', 'configs/finetune_cifar100.py'] +
           [f'configs/mixer_i1k.py:{v}' for v in VARIANTS])
STRATEGIES = ('replicate', 'fsdp')


def test_every_shipped_config_is_in_the_matrix():
  shipped = {f'configs/{n}' for n in os.listdir(os.path.join(REPO, 'configs'))
             if n.endswith('.py') and n not in ('__init__.py', 'common.py')}
  assert shipped == {s.split(':')[0] for s in SHIPPED}
  assert set(VARIANTS) == set(models.PAPER_VARIANTS)


def load(spec, strategy, shrink=True):
  path, *arg = os.path.join(REPO, spec).split(':', 1)
  config = runpy.run_path(path)['get_config'](*arg)
  config.sharding = strategy
  config.init_from = ''  # No weights are downloaded here.
  if shrink:  # Same functions, tiny sizes: 1 block of width 16, 2x2 tokens.
    m = config.model
    m.num_blocks, m.hidden_dim, m.tokens_mlp_dim, m.channels_mlp_dim = (
        1, 16, 8, 16)
    patch = int(m.variant.split('_')[1])
    config.image_size = 2 * patch
    config.pp.eval_resize = 2 * patch
    # Two examples per device.
    config.batch_size = 16 * config.grad_accum_steps
    config.fsdp_min_size_mb = 0.0  # Split even these tiny arrays.
  return config


# Compiled in the default suite (mixer_i1k.py:S_32 under fsdp, with every
# config.evals kind, is the command test below): each strategy, and grad
# accumulation with a bfloat16 momentum.
COMPILED = [('configs/quickstart.py', 'replicate'),
            ('configs/finetune_cifar100.py', 'fsdp')]


@pytest.mark.parametrize('spec,strategy', COMPILED)
def test_launch_check_compiles_every_function(spec, strategy):
  plan = launch_check.check(load(spec, strategy))
  names = [r.name for r in plan.rows]
  assert names[:3] == ['init', 'train_step', 'eval_step']
  assert plan.mesh == {'data': 8} and plan.sharding == strategy
  assert len(names) == 3  # No config.evals.
  for row in plan.rows[1:]:
    # Split 8 ways: near 1/8, far from 1 (no split). At these tiny sizes
    # LayerNorm, GELU and the (replicated) update are a large share, and
    # the stem's backward pass needs no input gradient (less than 3x).
    assert 0.8 / 8 < row.flops_fraction < 0.5, row
    assert row.total_bytes > 0
  train = plan.rows[1]
  if strategy == 'fsdp':  # Parameters gathered, gradients scattered.
    assert 'all-gather' in train.collectives
  else:
    assert set(train.collectives) == {'all-reduce'}


def test_every_config_resolves_under_both_strategies():
  # Without compiling: validation, class count, mesh, abstract state.
  from mixer_jax.training import trainer  # pylint: disable=g-import-not-at-top
  for spec in SHIPPED:
    for strategy in STRATEGIES:
      config = load(spec, strategy)
      launch_check.config_validation.validate_config(
          config, num_devices=jax.device_count(), num_processes=1)
      classes, _ = launch_check._dataset_facts(config)  # pylint: disable=protected-access
      assert classes == {'quickstart': 10, 'b16': 1000, 'mixer_i1k': 1000,
                         'finetune_cifar10': 10, 'finetune_cifar100': 100}[
                             os.path.basename(spec).split('.')[0]], spec
      mesh = trainer.create_mesh(config)
      assert mesh.devices.size == 8


def _train(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)  # --devices must bring its own devices.
  return subprocess.run([sys.executable, '-m', 'mixer_jax.train', *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_command_prints_rows_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  out = _train('--config=configs/mixer_i1k.py:S_32', f'--workdir={workdir}',
               '--check_only', '--devices=8', '--config.sharding=fsdp',
               '--config.model.num_blocks=1', '--config.model.hidden_dim=16',
               '--config.model.tokens_mlp_dim=8',
               '--config.model.channels_mlp_dim=16',
               '--config.image_size=64', '--config.batch_size=16',
               '--config.fsdp_min_size_mb=0', '--device_memory_gib=0.5')
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert 'Mixer S_32' in lines[0] and 'mesh data=8' in lines[0]
  assert 'configs/mixer_i1k.py:S_32' in lines[0]
  rows = {line.split()[0]: line for line in lines[2:]}
  assert set(rows) == {'init', 'train_step', 'eval_step', 'real_step',
                       'features_step'}  # Every config.evals kind.
  assert all(' yes ' in row for row in rows.values())
  assert rows['eval_step'].endswith(
      'eval_split, evals.minival, evals.v2, evals.val')
  assert rows['features_step'].count('fewshot/') == 6
  assert 'all-gather' in rows['train_step']  # fsdp gathers parameters.
  assert 'all-gather' not in rows['init']
  assert not workdir.exists()
  # A failure is one line and exit 1: here 12 does not split over 8.
  bad = _train('--config=configs/quickstart.py', f'--workdir={workdir}',
               '--check_only', '--devices=8', '--config.batch_size=12')
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith(
      'Launch check failed: ConfigError:')
  assert 'batch_size' in bad.stderr.strip().splitlines()[-1]
  assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get('MIXER_JAX_FULL_SIZE'),
    reason='about 25 minutes on 2 cores: MIXER_JAX_FULL_SIZE=1 runs it')
def test_full_size_matrix_compiles(capsys):
  """Every shipped config at its own sizes, both strategies (minutes)."""
  for spec in SHIPPED:
    for strategy in STRATEGIES:
      config = load(spec, strategy, shrink=False)
      plan = launch_check.check(config)
      with capsys.disabled():
        print(launch_check.format_plan(plan, 16, f'{spec} {strategy}'))
      train = plan.rows[1]
      # The model's matrix products split 8 ways: with remat off, one device
      # runs about 1/8 (LayerNorm, GELU and the update add a little; XLA's
      # count of the stem convolution is a little under the model's, which
      # put S/32 at 0.1231). Repeated work would show as 0.25 or more.
      assert 0.12 < train.flops_fraction < 0.15, (spec, strategy)

"""Gaussian diffusion against closed forms, a float64 numpy reference, and (when the
original DiT repository is available locally) the original PyTorch implementation."""

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpq_jax import diffusion

T = 1000
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ABAR = np.cumprod(1 - BETAS)


def toy_apply(variables, x, t, y=None):
  """A toy denoiser with learned-range variance output: (B, H, W, 2C)."""
  tt = (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
  eps = x * variables['a'] + variables['b'] * tt
  var = jnp.tanh(x * variables['c'] - tt)
  if y is not None:
    eps = eps + 0.01 * y.astype(jnp.float32)[:, None, None, None]
  return jnp.concatenate([eps, var], axis=-1)


VARS = {'a': jnp.float32(0.7), 'b': jnp.float32(0.3), 'c': jnp.float32(0.5)}


def _np_toy(x, t):
  tt = (t / 1000.0)[:, None, None, None]
  return x * 0.7 + 0.3 * tt, np.tanh(x * 0.5 - tt)


def _data(shape=(4, 4, 4, 3), seed=0):
  rng = np.random.default_rng(seed)
  x0 = np.clip(rng.standard_normal(shape) * 0.5, -1, 1).astype(np.float32)
  noise = rng.standard_normal(shape).astype(np.float32)
  return x0, noise


def test_q_sample_closed_form():
  d = diffusion.create_diffusion('')
  x0, noise = _data()
  t = np.array([0, 1, 500, 999])
  got = d.q_sample(x0, t, noise)
  want = np.sqrt(ABAR[t])[:, None, None, None] * x0 + np.sqrt(1 - ABAR[t])[:, None, None, None] * noise
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    'spacing,want',
    [
        ('250', [round(i * 999 / 249) for i in range(250)]),
        ('ddim50', list(range(0, 1000, 20))),
        ('ddim25', list(range(0, 1000, 40))),
        ('10,20,30', [round(i * 333 / 9) for i in range(10)] + [334 + round(i * 332 / 19) for i in range(20)]
         + [667 + round(i * 332 / 29) for i in range(30)]),
        ('', list(range(1000))),
    ],
)  # fmt: skip
def test_respacing(spacing, want):
  d = diffusion.create_diffusion(spacing)
  np.testing.assert_array_equal(d.timestep_map, want)
  assert d.num_timesteps == len(want)
  np.testing.assert_allclose(d.alphas_cumprod, ABAR[want], rtol=1e-10)
  assert (d.betas > 0).all() and (d.betas <= 1).all()


def test_bad_respacing():
  with pytest.raises(ValueError, match='ddim999'):
    diffusion.create_diffusion('ddim999')
  with pytest.raises(ValueError, match='cannot divide'):
    diffusion.create_diffusion('2000')
  with pytest.raises(ValueError, match='abc'):
    diffusion.create_diffusion('abc')


def _np_normal_kl(m1, lv1, m2, lv2):
  return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def _np_cdf(x):
  return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _np_losses(x0, noise, t, betas, timestep_map):
  """Training losses from the DDPM/IDDPM formulas, float64 numpy, for toy_apply."""
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  e = lambda a: a[t][:, None, None, None]
  x0, noise = x0.astype(np.float64), noise.astype(np.float64)
  xt = np.sqrt(e(abar)) * x0 + np.sqrt(1 - e(abar)) * noise
  eps, v = _np_toy(xt, timestep_map[t].astype(np.float64))
  post_var = betas * (1 - abar_prev) / (1 - abar)
  post_logvar = np.log(np.append(post_var[1], post_var[1:]))
  coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
  coef2 = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
  true_mean = e(coef1) * x0 + e(coef2) * xt
  frac = (v + 1) / 2
  logvar = frac * e(np.log(betas)) + (1 - frac) * e(post_logvar)
  pred_x0 = xt / np.sqrt(e(abar)) - np.sqrt(1 / e(abar) - 1) * eps
  mean = e(coef1) * pred_x0 + e(coef2) * xt
  kl = _np_normal_kl(true_mean, e(post_logvar), mean, logvar).mean(axis=(1, 2, 3)) / math.log(2)
  inv = np.exp(-0.5 * logvar)
  cp, cm = _np_cdf(inv * (x0 - mean + 1 / 255)), _np_cdf(inv * (x0 - mean - 1 / 255))
  logp = np.where(x0 < -0.999, np.log(np.maximum(cp, 1e-12)),
                  np.where(x0 > 0.999, np.log(np.maximum(1 - cm, 1e-12)), np.log(np.maximum(cp - cm, 1e-12))))  # fmt: skip
  nll = -logp.mean(axis=(1, 2, 3)) / math.log(2)
  vb = np.where(t == 0, nll, kl)
  mse = ((noise - eps) ** 2).mean(axis=(1, 2, 3))
  return {'mse': mse, 'vb': vb, 'loss': mse + vb}


@pytest.mark.parametrize('spacing', ['', '250'])
def test_training_losses_match_numpy(spacing):
  d = diffusion.create_diffusion(spacing)
  x0, noise = _data()
  x0[0, 0, 0] = [-1.0, 1.0, 0.2]  # both edge bins of the discretized likelihood
  t = np.array([0, 1, d.num_timesteps // 2, d.num_timesteps - 1])
  got = jax.jit(lambda v, x, t, n: d.training_losses(toy_apply, v, x, t, noise=n))(VARS, x0, t, noise)
  want = _np_losses(x0, noise, t, d.betas, d.timestep_map)
  for k in ('mse', 'vb', 'loss'):
    np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=1e-6, err_msg=k)


def test_vb_does_not_train_the_mean():
  """The vb term sees the mean output through stop_gradient, as the original's .detach()."""
  d = diffusion.create_diffusion('')
  x0, noise = _data()
  t = np.array([3, 100, 500, 900])
  g_vb = jax.grad(lambda v: d.training_losses(toy_apply, v, x0, t, noise=noise)['vb'].sum())(VARS)
  assert float(g_vb['a']) == 0.0 and float(g_vb['b']) == 0.0 and float(g_vb['c']) != 0.0
  with pytest.raises(ValueError, match='noise'):
    d.training_losses(toy_apply, VARS, x0, t)
  np.testing.assert_allclose(d.training_losses(toy_apply, VARS, x0, t, rng=jax.random.key(0))['loss'].shape, (4,))


def _np_ddim(x, steps_map, abar, label_shift=0.0):
  """Deterministic DDIM (eta=0) with the toy model, float64."""
  x = x.astype(np.float64)
  for i in reversed(range(len(abar))):
    t = np.full(x.shape[0], i)
    eps, _ = _np_toy(x, steps_map[t].astype(np.float64))
    eps = eps + label_shift
    ab, ab_prev = abar[i], (abar[i - 1] if i > 0 else 1.0)
    x0 = x / np.sqrt(ab) - np.sqrt(1 / ab - 1) * eps
    eps = (x / np.sqrt(ab) - x0) / np.sqrt(1 / ab - 1)
    x = x0 * np.sqrt(ab_prev) + np.sqrt(1 - ab_prev) * eps
  return x


def test_ddim_eta0_deterministic_and_matches_numpy():
  d = diffusion.create_diffusion('ddim5')
  _, noise = _data()
  a = d.ddim_sample_loop(toy_apply, VARS, noise.shape, jax.random.key(0), noise=noise)
  b = d.ddim_sample_loop(toy_apply, VARS, noise.shape, jax.random.key(1), noise=noise, progress=True)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, _np_ddim(noise, d.timestep_map, d.alphas_cumprod), rtol=1e-4, atol=1e-5)
  c = d.ddim_sample_loop(toy_apply, VARS, noise.shape, jax.random.key(1), noise=noise, eta=1.0)
  assert not np.allclose(a, c)


def test_ddpm_loop_reproducible_and_noise_free_last_step():
  d = diffusion.create_diffusion('4')
  _, noise = _data()
  run = functools.partial(d.p_sample_loop, toy_apply, VARS, noise.shape, noise=noise)
  a, b, c = run(jax.random.key(0)), run(jax.random.key(0), progress=True), run(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert a.shape == noise.shape and np.isfinite(a).all() and not np.allclose(a, c)
  # The step at t == 0 returns the posterior mean whatever the key: no noise is added.
  t0, t1 = jnp.zeros(4, jnp.int32), jnp.ones(4, jnp.int32)
  mean = d.p_mean_variance(toy_apply, VARS, noise, t0, clip_denoised=False)['mean']
  for key in (jax.random.key(5), jax.random.key(6)):
    np.testing.assert_allclose(d.p_sample_step(toy_apply, VARS, noise, t0, key), mean, rtol=1e-6)
  s5, s6 = (d.p_sample_step(toy_apply, VARS, noise, t1, jax.random.key(k)) for k in (5, 6))
  assert not np.allclose(s5, s6)
  with pytest.raises(ValueError, match='expected'):
    d.p_sample_loop(toy_apply, VARS, (2, 4, 4, 3), jax.random.key(0), noise=noise)


def test_cfg_batch_and_guidance():
  _, noise = _data((3, 4, 4, 3))
  y = jnp.array([1, 2, 3])
  z, yy = diffusion.cfg_batch(noise, y, num_classes=10)
  assert z.shape == (6, 4, 4, 3) and yy.tolist() == [1, 2, 3, 10, 10, 10]
  np.testing.assert_array_equal(z[:3], z[3:])
  np.testing.assert_array_equal(diffusion.split_cfg(z), noise)

  def guided(variables, x, t, y, cfg_scale):
    out = toy_apply(variables, x, t, y)
    cond, uncond = jnp.split(out[..., :3], 2)
    half = uncond + cfg_scale * (cond - uncond)
    return jnp.concatenate([jnp.concatenate([half, half]), out[..., 3:]], axis=-1)

  d = diffusion.create_diffusion('ddim4')
  out = d.ddim_sample_loop(guided, VARS, z.shape, jax.random.key(0), noise=z, model_kwargs={'y': yy, 'cfg_scale': 2.0})
  # Guided eps = uncond + 2 (cond - uncond) = toy eps + 0.01 * (2 y - null): a label shift.
  shift = (0.01 * (2 * np.array([1, 2, 3]) - 10.0))[:, None, None, None]
  want = _np_ddim(np.asarray(noise), d.timestep_map, d.alphas_cumprod, label_shift=shift)
  np.testing.assert_allclose(diffusion.split_cfg(out), want, rtol=1e-4, atol=1e-5)


# -- the original PyTorch implementation, when its source is on this machine -------------------

ORIGINAL_REPO = os.environ.get('DIT_REPO', '/work/.mirror/facebookresearch+DiT/repo')


@pytest.fixture(scope='module')
def original(tmp_path_factory):
  if not os.path.isdir(ORIGINAL_REPO):
    pytest.skip(f'original DiT repository not found at {ORIGINAL_REPO} (set DIT_REPO); numpy references still run')
  pkg = tmp_path_factory.mktemp('orig') / 'diffusion'
  pkg.mkdir()
  for name in ('__init__.py', 'gaussian_diffusion.py', 'respace.py', 'diffusion_utils.py', 'timestep_sampler.py'):
    src = subprocess.run(['git', '-C', ORIGINAL_REPO, 'show', f'HEAD:diffusion/{name}'], capture_output=True, text=True)
    if src.returncode:
      pytest.skip(f'cannot read diffusion/{name} from {ORIGINAL_REPO}')
    (pkg / name).write_text(src.stdout)
  sys.path.insert(0, str(pkg.parent))
  try:
    import diffusion as orig  # the original's package name
  finally:
    sys.path.pop(0)
  return orig


@pytest.mark.parametrize('spacing', ['', '250'])
def test_training_losses_match_original(original, spacing):
  import torch

  d_orig = original.create_diffusion(spacing)
  d = diffusion.create_diffusion(spacing)
  x0, noise = _data()
  t = np.array([0, 1, d.num_timesteps // 2, d.num_timesteps - 1])

  def torch_model(x, t, **_):
    out = toy_apply(VARS, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()))
    return torch.from_numpy(np.asarray(out).transpose(0, 3, 1, 2).copy())

  want = d_orig.training_losses(torch_model, torch.from_numpy(x0.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                                noise=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()))  # fmt: skip
  got = d.training_losses(toy_apply, VARS, x0, t, noise=noise)
  for k in ('mse', 'vb', 'loss'):
    np.testing.assert_allclose(got[k], want[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(d.timestep_map, d_orig.timestep_map)

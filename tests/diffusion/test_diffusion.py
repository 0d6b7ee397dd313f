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
from dpq_jax.diffusion import sampling

T = 1000
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ABAR = np.cumprod(1 - BETAS)
# float32 tables and arithmetic against float64: the KL of two close Gaussians cancels, so
# small vb values need an absolute tolerance.
RTOL, ATOL = 1e-5, 1e-6


def toy_apply(variables, x, t, y=None):
  """A toy denoiser with learned-range variance output: (B, H, W, 2C)."""
  tt = (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
  eps = x * variables['a'] + variables['b'] * tt
  var = jnp.tanh(x * variables['c'] - tt)
  if y is not None:
    eps = eps + 0.01 * y.astype(jnp.float32)[:, None, None, None]
  return jnp.concatenate([eps, var], axis=-1)


def toy_apply_fixed(variables, x, t):
  """The toy denoiser's eps only: for fixed-variance processes."""
  return toy_apply(variables, x, t)[..., : x.shape[-1]]


VARS = {'a': jnp.float32(0.7), 'b': jnp.float32(0.3), 'c': jnp.float32(0.5)}


def _np_toy(x, t):
  tt = (t / 1000.0)[:, None, None, None]
  return x * 0.7 + 0.3 * tt, np.tanh(x * 0.5 - tt)


def _data(shape=(4, 4, 4, 3), seed=0):
  rng = np.random.default_rng(seed)
  x0 = np.clip(rng.standard_normal(shape) * 0.5, -1, 1).astype(np.float32)
  x0[0, 0, 0] = [-1.0, 1.0, 0.2]  # both edge bins of the discretized likelihood
  noise = rng.standard_normal(shape).astype(np.float32)
  return x0, noise


def test_q_sample_closed_form():
  d = diffusion.create_diffusion('')
  x0, noise = _data()
  t = np.array([0, 1, 500, 999])
  got = d.q_sample(x0, t, noise)
  want = np.sqrt(ABAR[t])[:, None, None, None] * x0 + np.sqrt(1 - ABAR[t])[:, None, None, None] * noise
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  mean, var, logvar = d.q_mean_variance(x0, t)
  np.testing.assert_allclose(var[:, 0, 0, 0], 1 - ABAR[t], rtol=1e-6)
  np.testing.assert_allclose(logvar[:, 0, 0, 0], np.log(1 - ABAR[t]), rtol=1e-5)
  assert mean.shape == var.shape == logvar.shape == x0.shape


def _sections(counts, total=T):
  """Per-section evenly spaced steps, written from the definition (first sections take the remainder)."""
  sizes = [total // len(counts) + (i < total % len(counts)) for i in range(len(counts))]
  out, start = [], 0
  for size, n in zip(sizes, counts):
    out += [start + round(j * (size - 1) / (n - 1)) for j in range(n)]
    start += size
  return out


@pytest.mark.parametrize(
  'spacing,want',
  [
    ('250', [round(i * 999 / 249) for i in range(250)]),
    (250, [round(i * 999 / 249) for i in range(250)]),
    ('ddim50', list(range(0, 1000, 20))),
    ('ddim25', list(range(0, 1000, 40))),
    ('10,20,30', _sections([10, 20, 30])),
    ('', list(range(1000))),
  ],
)
def test_respacing(spacing, want):
  d = diffusion.create_diffusion(spacing)
  np.testing.assert_array_equal(d.timestep_map, want)
  assert d.num_timesteps == len(want)
  np.testing.assert_allclose(d.alphas_cumprod, ABAR[want], rtol=1e-10)
  assert (d.betas > 0).all() and (d.betas <= 1).all()


def test_respacing_endpoints():
  assert diffusion.create_diffusion('250').timestep_map[[0, 1, -1]].tolist() == [0, 4, 999]
  assert np.diff(diffusion.create_diffusion('ddim50').timestep_map).tolist() == [20] * 49


@pytest.mark.parametrize(
  'spacing,match',
  [('ddim999', 'ddim999'), ('ddimx', 'ddimx'), ('2000', 'cannot divide'), ('abc', 'abc'), ('0', 'cannot divide')],
)
def test_bad_respacing(spacing, match):
  with pytest.raises(ValueError, match=match):
    diffusion.create_diffusion(spacing)


def test_bad_schedule():
  with pytest.raises(ValueError, match='cosine'):
    diffusion.create_diffusion('', noise_schedule='cosine')


# -- training losses ---------------------------------------------------------------------------


def _np_normal_kl(m1, lv1, m2, lv2):
  return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def _np_cdf(x):
  return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _np_losses(x0, noise, t, betas, timestep_map):
  """Training-loss terms from the DDPM/IDDPM formulas, float64 numpy, for toy_apply."""
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
  return {'mse': ((noise - eps) ** 2).mean(axis=(1, 2, 3)), 'vb': np.where(t == 0, nll, kl)}


@pytest.mark.parametrize(
  'spacing,kwargs',
  [('', {}), ('250', {}), ('250', {'rescale_learned_sigmas': True}), ('250', {'use_kl': True}), ('', {'use_kl': True})],
)
def test_training_losses_match_numpy(spacing, kwargs):
  d = diffusion.create_diffusion(spacing, **kwargs)
  x0, noise = _data()
  t = np.array([0, 1, d.num_timesteps // 2, d.num_timesteps - 1])
  got = jax.jit(lambda v, x, t, n: d.training_losses(toy_apply, v, x, t, noise=n))(VARS, x0, t, noise)
  ref = _np_losses(x0, noise, t, d.betas, d.timestep_map)
  if kwargs.get('use_kl'):
    want = {'loss': ref['vb'] * d.num_timesteps}
  else:
    vb = ref['vb'] * (d.num_timesteps / 1000 if kwargs.get('rescale_learned_sigmas') else 1.0)
    want = {'mse': ref['mse'], 'vb': vb, 'loss': ref['mse'] + vb}
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].shape == (4,)
    np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL * (d.num_timesteps if 'use_kl' in kwargs else 1))


def test_training_losses_fixed_variance_is_mse_only():
  d = diffusion.create_diffusion('', learn_sigma=False)
  x0, noise = _data()
  t = np.array([0, 10, 500, 999])
  got = d.training_losses(toy_apply_fixed, VARS, x0, t, noise=noise)
  assert sorted(got) == ['loss', 'mse']
  np.testing.assert_allclose(got['loss'], _np_losses(x0, noise, t, BETAS, np.arange(T))['mse'], rtol=RTOL)
  with pytest.raises(ValueError, match='shape'):
    d.training_losses(toy_apply, VARS, x0, t, noise=noise)  # 2C channels for a fixed variance


def test_vb_does_not_train_the_mean():
  """The vb term sees the mean output through stop_gradient, as the original's .detach()."""
  d = diffusion.create_diffusion('')
  x0, noise = _data()
  t = np.array([3, 100, 500, 900])
  g_vb = jax.grad(lambda v: d.training_losses(toy_apply, v, x0, t, noise=noise)['vb'].sum())(VARS)
  assert float(g_vb['a']) == 0.0 and float(g_vb['b']) == 0.0 and float(g_vb['c']) != 0.0
  g = jax.jit(jax.grad(lambda v: d.training_losses(toy_apply, v, x0, t, noise=noise)['loss'].sum()))(VARS)
  assert all(np.isfinite(float(g[k])) and float(g[k]) != 0.0 for k in g)


def test_training_losses_noise_from_rng():
  d = diffusion.create_diffusion('')
  x0, _ = _data()
  t = np.array([3, 100, 500, 900])
  with pytest.raises(ValueError, match='rng'):
    d.training_losses(toy_apply, VARS, x0, t)
  key = jax.random.key(0)
  a = d.training_losses(toy_apply, VARS, x0, t, rng=key)['loss']
  b = d.training_losses(toy_apply, VARS, x0, t, noise=jax.random.normal(key, x0.shape))['loss']
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('sigma_small', [False, True])
def test_fixed_variances(sigma_small):
  d = diffusion.create_diffusion('', learn_sigma=False, sigma_small=sigma_small)
  _, noise = _data()
  t = np.array([0, 1, 500, 999])
  out = d.p_mean_variance(toy_apply_fixed, VARS, noise, t)
  abar_prev = np.append(1.0, ABAR[:-1])
  post = BETAS * (1 - abar_prev) / (1 - ABAR)
  want = np.append(post[1], post[1:]) if sigma_small else np.append(post[1], BETAS[1:])
  if sigma_small:
    np.testing.assert_allclose(out['variance'][:, 0, 0, 0], post[t], rtol=1e-6)  # 0 at t=0, log clipped
  else:
    np.testing.assert_allclose(out['variance'][:, 0, 0, 0], want[t], rtol=1e-6)
  np.testing.assert_allclose(out['log_variance'][:, 0, 0, 0], np.log(want[t]), rtol=1e-5)
  assert np.abs(out['pred_xstart']).max() <= 1.0  # clip_denoised defaults to True


# -- samplers ----------------------------------------------------------------------------------


def _np_ddim(x, steps_map, abar, label_shift=0.0):
  """Deterministic DDIM (eta=0) with the toy model, float64."""
  x = x.astype(np.float64)
  for i in reversed(range(len(abar))):
    eps, _ = _np_toy(x, np.full(x.shape[0], steps_map[i], np.float64))
    eps = eps + label_shift
    ab, ab_prev = abar[i], (abar[i - 1] if i > 0 else 1.0)
    x0 = x / np.sqrt(ab) - np.sqrt(1 / ab - 1) * eps
    x = x0 * np.sqrt(ab_prev) + np.sqrt(1 - ab_prev) * eps
  return x


def test_ddim_eta0_deterministic_and_matches_numpy():
  d = diffusion.create_diffusion('ddim5')
  _, noise = _data()
  a = d.ddim_sample_loop(toy_apply, VARS, noise.shape, jax.random.key(0), noise=noise)
  b = d.ddim_sample_loop(toy_apply, VARS, noise.shape, jax.random.key(1), noise=noise, progress=True)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, _np_ddim(noise, d.timestep_map, d.alphas_cumprod), rtol=1e-5, atol=1e-5)
  c = d.ddim_sample_loop(toy_apply, VARS, noise.shape, jax.random.key(1), noise=noise, eta=1.0)
  assert not np.allclose(a, c)


def test_ddim_reverse_sample_matches_numpy():
  d = diffusion.create_diffusion('ddim5')
  _, x = _data()
  t = np.array([0, 1, 2, 3])
  got = d.ddim_reverse_sample(toy_apply, VARS, x, t)['sample']
  eps, _ = _np_toy(x.astype(np.float64), d.timestep_map[t].astype(np.float64))
  ab, ab_next = d.alphas_cumprod[t][:, None, None, None], np.append(d.alphas_cumprod[1:], 0.0)[t][:, None, None, None]
  x0 = x / np.sqrt(ab) - np.sqrt(1 / ab - 1) * eps
  np.testing.assert_allclose(got, x0 * np.sqrt(ab_next) + np.sqrt(1 - ab_next) * eps, rtol=1e-5, atol=1e-5)


def test_ddpm_loop_reproducible_and_noise_free_last_step():
  d = diffusion.create_diffusion('4')
  _, noise = _data()
  run = functools.partial(d.p_sample_loop, toy_apply, VARS, noise.shape, noise=noise)
  a, b, c = run(jax.random.key(0)), run(jax.random.key(0), progress=True), run(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert a.shape == noise.shape and a.dtype == jnp.float32 and np.isfinite(a).all() and not np.allclose(a, c)
  # The step at t == 0 returns the posterior mean whatever the key: no noise is added.
  t0, t1 = jnp.zeros(4, jnp.int32), jnp.ones(4, jnp.int32)
  mean = d.p_mean_variance(toy_apply, VARS, noise, t0, clip_denoised=False)['mean']
  for key in (jax.random.key(5), jax.random.key(6)):
    np.testing.assert_allclose(d.p_sample(toy_apply, VARS, noise, t0, key)['sample'], mean, rtol=1e-6)
  s5, s6 = (d.p_sample(toy_apply, VARS, noise, t1, jax.random.key(k))['sample'] for k in (5, 6))
  assert not np.allclose(s5, s6)
  with pytest.raises(ValueError, match='expected'):
    d.p_sample_loop(toy_apply, VARS, (2, 4, 4, 3), jax.random.key(0), noise=noise)


def test_ddpm_loop_from_rng_and_padded_progress_chunks(monkeypatch):
  d = diffusion.create_diffusion('7')
  shape = (2, 4, 4, 3)
  a = d.p_sample_loop(toy_apply, VARS, shape, jax.random.key(3))
  assert a.shape == shape and np.isfinite(a).all()
  # 7 steps in chunks of 3: the last chunk carries two padding steps that must not run.
  monkeypatch.setattr(sampling, 'MAX_CHUNK', 3)
  b = d.p_sample_loop(toy_apply, VARS, shape, jax.random.key(3), progress=True)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_cfg_batch_and_guidance():
  _, noise = _data((3, 4, 4, 3))
  y = jnp.array([1, 2, 3])
  z, yy = diffusion.cfg_batch(noise, y, num_classes=10)
  assert z.shape == (6, 4, 4, 3) and yy.tolist() == [1, 2, 3, 10, 10, 10]
  np.testing.assert_array_equal(z[:3], z[3:])
  np.testing.assert_array_equal(diffusion.split_cfg(z), noise)
  with pytest.raises(ValueError, match='labels'):
    diffusion.cfg_batch(noise, y[:2], num_classes=10)

  def guided(variables, x, t, y, cfg_scale):
    # forward_with_cfg of the original: guidance on the eps channels, halves share x.
    half = x[: x.shape[0] // 2]
    out = toy_apply(variables, jnp.concatenate([half, half]), t, y)
    cond, uncond = jnp.split(out[..., :3], 2)
    eps = uncond + cfg_scale * (cond - uncond)
    return jnp.concatenate([jnp.concatenate([eps, eps]), out[..., 3:]], axis=-1)

  d = diffusion.create_diffusion('ddim4')
  out = d.ddim_sample_loop(guided, VARS, z.shape, jax.random.key(0), noise=z, model_kwargs={'y': yy, 'cfg_scale': 2.0})
  # Guided eps = uncond + 2 (cond - uncond) = toy eps + 0.01 * (2 y - null): a label shift.
  shift = (0.01 * (2 * np.array([1, 2, 3]) - 10.0))[:, None, None, None]
  want = _np_ddim(np.asarray(noise), d.timestep_map, d.alphas_cumprod, label_shift=shift)
  np.testing.assert_allclose(diffusion.split_cfg(out), want, rtol=1e-5, atol=1e-5)


# -- the original PyTorch implementation, when its source is on this machine -------------------

ORIGINAL_REPO = os.environ.get('DIT_REPO', '/work/.mirror/facebookresearch+DiT/repo')


@pytest.fixture(scope='module')
def original(tmp_path_factory):
  pytest.importorskip('torch', reason='the original implementation needs torch')
  if not os.path.isdir(ORIGINAL_REPO):
    pytest.skip(f'original DiT repository not found at {ORIGINAL_REPO} (set DIT_REPO); numpy references still run')
  pkg = tmp_path_factory.mktemp('orig') / 'diffusion'
  pkg.mkdir()
  for name in ('__init__.py', 'gaussian_diffusion.py', 'respace.py', 'diffusion_utils.py'):
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


def _nchw(a):
  import torch

  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _torch_model(apply_fn):
  """The JAX toy model as a PyTorch NCHW model of the original's interface."""
  import torch

  def model(x, t, **kwargs):
    kwargs = {k: jnp.asarray(v.numpy()) for k, v in kwargs.items()}
    out = apply_fn(VARS, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()), **kwargs)
    return _nchw(out).to(torch.float32)

  return model


@pytest.mark.parametrize(
  'spacing,kwargs',
  [('', {}), ('250', {}), ('250', {'rescale_learned_sigmas': True}), ('250', {'use_kl': True})],
)
def test_training_losses_match_original(original, spacing, kwargs):
  import torch

  d_orig = original.create_diffusion(spacing, **kwargs)
  d = diffusion.create_diffusion(spacing, **kwargs)
  np.testing.assert_array_equal(d.timestep_map, d_orig.timestep_map)
  for name in ('betas', 'alphas_cumprod', 'posterior_variance', 'posterior_log_variance_clipped'):
    np.testing.assert_array_equal(getattr(d, name), getattr(d_orig, name), err_msg=name)
  x0, noise = _data()
  t = np.array([0, 1, d.num_timesteps // 2, d.num_timesteps - 1])
  want = d_orig.training_losses(_torch_model(toy_apply), _nchw(x0), torch.from_numpy(t), noise=_nchw(noise))
  got = d.training_losses(toy_apply, VARS, x0, t, noise=noise)
  assert sorted(got) == sorted(want)
  for k in got:
    np.testing.assert_allclose(got[k], want[k].numpy(), rtol=RTOL, atol=ATOL * d.num_timesteps, err_msg=k)


@pytest.mark.parametrize('learn_sigma,sigma_small', [(True, False), (False, False), (False, True)])
def test_p_mean_variance_and_ddim_match_original(original, learn_sigma, sigma_small):
  import torch

  apply_fn = toy_apply if learn_sigma else toy_apply_fixed
  d_orig = original.create_diffusion('ddim5', learn_sigma=learn_sigma, sigma_small=sigma_small)
  d = diffusion.create_diffusion('ddim5', learn_sigma=learn_sigma, sigma_small=sigma_small)
  _, x = _data()
  t = np.array([0, 1, 3, 4])
  want = d_orig.p_mean_variance(_torch_model(apply_fn), _nchw(x), torch.from_numpy(t), clip_denoised=True)
  got = d.p_mean_variance(apply_fn, VARS, x, t, clip_denoised=True)
  for k in ('mean', 'variance', 'log_variance', 'pred_xstart'):
    np.testing.assert_allclose(got[k], want[k].numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6, err_msg=k)
  want = d_orig.ddim_sample_loop(_torch_model(apply_fn), x.shape[:1] + x.shape[3:] + x.shape[1:3], noise=_nchw(x),
                                 clip_denoised=False, device='cpu')  # fmt: skip
  got = d.ddim_sample_loop(apply_fn, VARS, x.shape, jax.random.key(0), noise=x)
  np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)

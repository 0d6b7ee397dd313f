"""Converter: original-format and diffusers checkpoints, the CLI, and every refusal."""

import argparse
import json

import numpy as np
import pytest
import torch

from benchmarks import torch_reference as torch_refs
from dpq_jax import convert, errors
from dpq_jax.models.spec import ModelSpec
from tests import helpers


def _original_state_dict(state):
  """A synthetic original-format state_dict, pos_embed buffer included, as torch tensors."""
  from dpq_jax.models import dit

  out = {k: torch.from_numpy(v) for k, v in state.items()}
  out['pos_embed'] = torch.from_numpy(dit.get_2d_sincos_pos_embed(384, 4)).float()[None]
  return out


def _check_forward(ref, spec, params):
  x = np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32)
  t, y = np.array([0, 999]), np.array([3, 10])
  got = spec.create().apply({'params': params}, x, t, y)
  want = torch_refs.diffusers_forward(ref, x, t, y)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_plain_state_dict(torch_dit, tmp_path):
  ref, state = torch_dit
  path = tmp_path / 'DiT-S-2.pt'
  torch.save(_original_state_dict(state), path)
  spec, params = convert.load_torch_checkpoint(str(path))
  assert spec == ModelSpec('DiT-S/2', input_size=8, num_classes=10)
  _check_forward(ref, spec, params)


def test_training_checkpoint_takes_ema_and_allows_namespace(torch_dit, tmp_path):
  ref, state = torch_dit
  sd = _original_state_dict(state)
  model_sd = {k: torch.zeros_like(v) for k, v in sd.items()}  # 'model' differs: EMA must win
  path = tmp_path / '0050000.pt'
  torch.save(
    {
      'model': model_sd,
      'ema': sd,
      'opt': {'state': {}, 'param_groups': []},
      'args': argparse.Namespace(model='DiT-S/2', image_size=64),
    },
    path,
  )
  name, params = convert.load_torch_dit(str(path))
  assert name == 'DiT-S/2'
  _check_forward(ref, ModelSpec('DiT-S/2', input_size=8, num_classes=10), params)


def test_diffusers_folder(torch_dit, tmp_path):
  ref, _ = torch_dit
  ref.save_pretrained(tmp_path / 'transformer', safe_serialization=True)
  name, params = convert.load_torch_dit(str(tmp_path / 'transformer'))
  assert name == 'DiT-S/2'
  _check_forward(ref, ModelSpec('DiT-S/2', input_size=8, num_classes=10), params)
  # A whole pipeline folder (transformer/ inside) works as well.
  name2, _ = convert.load_torch_dit(str(tmp_path))
  assert name2 == 'DiT-S/2'


def test_diffusers_untied_embedders_refused(torch_dit, tmp_path):
  ref, _ = torch_dit
  sd = torch_refs.state_dict_numpy(ref)
  sd['transformer_blocks.3.norm1.emb.timestep_embedder.linear_1.bias'] += 1.0
  with pytest.raises(errors.CheckpointError, match='block 3'):
    convert.diffusers_to_original(sd)


def test_wrong_model_name(torch_dit, tmp_path):
  _, state = torch_dit
  with pytest.raises(ValueError, match='unknown DiT model'):
    convert.infer_spec(state, 'DiT-Q/3', 8)
  with pytest.raises(errors.CheckpointError, match='does not match the checkpoint'):
    convert.infer_spec(state, 'DiT-B/2', 8)


def test_missing_and_extra_keys(torch_dit):
  _, state = torch_dit
  spec = convert.infer_spec(state, None, 8)
  missing = dict(state)
  del missing['blocks.4.mlp.fc2.weight']
  with pytest.raises(errors.CheckpointError, match=r'missing for DiT-S/2: blocks_4/mlp/fc2/kernel'):
    convert.original_to_flax(missing, spec)
  extra = dict(state, **{'blocks.4.mlp.fc3.weight': np.zeros(3, np.float32), 'foo': np.zeros(1, np.float32)})
  with pytest.raises(errors.CheckpointError, match=r'unconsumed source keys: blocks.4.mlp.fc3.weight, foo'):
    convert.original_to_flax(extra, spec)
  wrong = dict(state, **{'blocks.0.attn.proj.bias': np.zeros(5, np.float32)})
  with pytest.raises(errors.CheckpointError, match=r'blocks_0/attn/proj/bias has shape \(5,\)'):
    convert.original_to_flax(wrong, spec)


def test_truncated_file(torch_dit, tmp_path):
  _, state = torch_dit
  path = tmp_path / 'full.pt'
  torch.save(_original_state_dict(state), path)
  data = path.read_bytes()
  cut = tmp_path / 'cut.pt'
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(errors.CheckpointError, match='truncated'):
    convert.load_torch_checkpoint(str(cut))
  with pytest.raises(errors.CheckpointError, match='does not exist'):
    convert.load_torch_checkpoint(str(tmp_path / 'nope.pt'))


class _Payload:
  """Unpickling this would run code: it creates the file named in marker."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_pickled_code_is_refused_not_run(torch_dit, tmp_path):
  _, state = torch_dit
  marker = tmp_path / 'pwned'
  sd = _original_state_dict(state)
  path = tmp_path / 'evil.pt'
  torch.save({'ema': sd, 'args': _Payload(str(marker))}, path)
  with pytest.raises(errors.CheckpointError, match='refusing to load'):
    convert.load_torch_checkpoint(str(path))
  assert not marker.exists()


def test_cli_roundtrip_and_failed_run_keeps_output(torch_dit, tmp_path):
  ref, state = torch_dit
  src = tmp_path / 'DiT-S-2.pt'
  torch.save(_original_state_dict(state), src)
  out = tmp_path / 'converted'
  r = helpers.run_convert('--checkpoint', str(src), '--output', str(out))
  assert r.returncode == 0, r.stderr
  spec, params = convert.load_converted(str(out))
  assert json.loads((out / 'model.json').read_text())['name'] == 'DiT-S/2'
  _check_forward(ref, spec, params)
  before = sorted(p.relative_to(out).as_posix() for p in out.rglob('*'))
  # A failing conversion onto the same output: one error line, non-zero exit, output intact.
  bad = tmp_path / 'bad.pt'
  bad.write_bytes(src.read_bytes()[:1000])
  r = helpers.run_convert('--checkpoint', str(bad), '--output', str(out))
  assert r.returncode != 0
  assert r.stderr.strip().count('\n') == 0 and r.stderr.startswith('error:'), r.stderr
  assert sorted(p.relative_to(out).as_posix() for p in out.rglob('*')) == before
  spec2, params2 = convert.load_converted(str(out))
  _check_forward(ref, spec2, params2)
  assert not [p for p in tmp_path.iterdir() if '.tmp-' in p.name]


def test_cli_wrong_model_and_unwritable_output(torch_dit, tmp_path):
  _, state = torch_dit
  src = tmp_path / 'DiT-S-2.pt'
  torch.save(_original_state_dict(state), src)
  r = helpers.run_convert('--checkpoint', str(src), '--output', str(tmp_path / 'o'), '--model', 'DiT-B/2')
  assert r.returncode != 0 and 'DiT-B/2 does not match' in r.stderr
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  r = helpers.run_convert('--checkpoint', str(src), '--output', str(blocker / 'out'))
  assert r.returncode != 0 and 'not writable' in r.stderr, r.stderr
  assert blocker.read_text() == 'x'
  assert not (tmp_path / 'o').exists()


def test_safetensors_only_in_diffusers_folder(torch_dit, tmp_path):
  ref, _ = torch_dit
  folder = tmp_path / 'transformer'
  ref.save_pretrained(folder, safe_serialization=True)
  for f in folder.glob('*.safetensors'):
    f.unlink()
  torch.save(ref.state_dict(), folder / 'diffusion_pytorch_model.bin')
  with pytest.raises(errors.CheckpointError, match='no .safetensors'):
    convert.load_torch_dit(str(folder))

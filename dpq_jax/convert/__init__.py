"""PyTorch checkpoints -> Flax params, by what they convert.

  dit.py         original DiT .pt files and diffusers DiT folders -> DiT params (+ ModelSpec)
  vae.py         diffusers AutoencoderKL folders -> SD-VAE params; converted VAE directories
  checkpoint.py  converted directories on disk: DIR/model.json + DIR/params (orbax)
  io.py          tensor readers that never unpickle code, and nesting with shape checks

The names below are re-exported, so `dpq_jax.convert.load_torch_dit(path, name=None)` (the public
contract) and `convert.X` keep working.
"""

from dpq_jax.convert.checkpoint import (
  PARAMS_DIR,
  SPEC_FILE,
  check_writable_dir_parent,
  is_converted,
  load_any,
  load_converted,
  save_converted,
)
from dpq_jax.convert.dit import (
  diffusers_to_original,
  infer_spec,
  load_torch_checkpoint,
  load_torch_dit,
  original_to_flax,
  read_diffusers_folder,
)
from dpq_jax.convert.io import read_torch_state_dict
from dpq_jax.convert.vae import (
  RANDOM_VAE,
  load_torch_vae,
  load_vae,
  read_vae_folder,
  save_converted_vae,
  vae_to_flax,
)
from dpq_jax.errors import CheckpointError
from dpq_jax.models.spec import ModelSpec

__all__ = [
  'PARAMS_DIR',
  'RANDOM_VAE',
  'SPEC_FILE',
  'CheckpointError',
  'ModelSpec',
  'check_writable_dir_parent',
  'diffusers_to_original',
  'infer_spec',
  'is_converted',
  'load_any',
  'load_converted',
  'load_torch_checkpoint',
  'load_torch_dit',
  'load_torch_vae',
  'load_vae',
  'original_to_flax',
  'read_diffusers_folder',
  'read_torch_state_dict',
  'read_vae_folder',
  'save_converted',
  'save_converted_vae',
  'vae_to_flax',
]

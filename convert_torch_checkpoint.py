r"""Converts a PyTorch DiT checkpoint to Flax params saved with orbax.

  python convert_torch_checkpoint.py --checkpoint DiT-XL-2-256x256.pt --output ckpt/dit_xl_2_256
  python convert_torch_checkpoint.py --checkpoint path/to/diffusers/transformer --output ckpt/x

IN is an original DiT .pt (a plain state_dict, or a train.py checkpoint holding model/ema/opt;
EMA weights are taken, as the original's sample.py does) or a diffusers DiT folder. The model
and input size are inferred from tensor shapes unless given. The output directory holds
model.json and params/ (orbax) and is replaced atomically: a failed run leaves it as it was.

With --vae, IN is a diffusers AutoencoderKL folder (config.json + safetensors or a .bin
state_dict, e.g. stabilityai/sd-vae-ft-ema) and the output is the Flax SD-VAE:

  python convert_torch_checkpoint.py --vae --checkpoint sd-vae-ft-ema --output ckpt/sd_vae_ft_ema
"""

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='original .pt file or diffusers DiT folder')
  parser.add_argument('--output', required=True, help='output directory (model.json + params/)')
  parser.add_argument('--model', default=None, help='e.g. DiT-XL/2 (default: inferred from shapes)')
  parser.add_argument('--image-size', type=int, default=None, choices=[256, 512], help='image size (default: inferred)')
  parser.add_argument('--vae', action='store_true', help='IN is a diffusers AutoencoderKL folder (the SD VAE)')
  args = parser.parse_args(argv)
  if args.vae:
    if args.model is not None or args.image_size is not None:
      parser.error('--model and --image-size describe a DiT; they do not apply with --vae')
    return _convert_vae(args.checkpoint, args.output)

  from dpq_jax import convert, errors
  from dpq_jax.models import dit

  with errors.reported(also=(ValueError, OSError)):
    if args.model is not None:
      dit.parse_name(args.model)
    convert.check_writable_dir_parent(args.output)
    spec, params = convert.load_torch_checkpoint(
      args.checkpoint, args.model, None if args.image_size is None else args.image_size // 8
    )
    convert.save_converted(args.output, spec, params, source=args.checkpoint)
  n = sum(v.size for v in _leaves(params))
  print(f'converted {args.checkpoint} -> {args.output}: {spec.name}, {spec.input_size * 8}px, {n:,} params')
  return 0


def _convert_vae(checkpoint: str, output: str) -> int:
  from dpq_jax import convert, errors

  with errors.reported(also=(ValueError, OSError)):
    convert.check_writable_dir_parent(output)
    config, params = convert.load_torch_vae(checkpoint)
    convert.save_converted_vae(output, config, params, source=checkpoint)
  n = sum(v.size for v in _leaves(params))
  print(f'converted VAE {checkpoint} -> {output}: block_out_channels {list(config.block_out_channels)}, {n:,} params')
  return 0


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


if __name__ == '__main__':
  sys.exit(main())

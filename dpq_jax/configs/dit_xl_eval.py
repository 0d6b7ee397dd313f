r"""The paper's evaluation protocol: DiT-XL/2 256x256, DDPM 250 steps, cfg 1.5, random labels, ADM metrics.

Samples go to DIR/samples.npz (ADM format, decoded with the SD VAE that DiT uses: sd-vae-ft-ema), then the
evaluate stage scores them against ADM's ImageNet 256x256 reference batch (VIRTUAL_imagenet256_labeled.npz)
with FID, sFID, precision and recall as ADM's evaluator (Inception Score only with
config.evaluate.is_network). Published full-precision references: FID 2.27 on 50k samples (DiT paper);
the 10k-sample protocol of quantization papers gives about 4.5.

  python -m dpq_jax.main --config=dit_xl_eval \
      --config.model.checkpoint=DiT-XL-2-256x256.pt --config.vae.checkpoint=sd-vae-ft-ema \
      --config.evaluate.reference=VIRTUAL_imagenet256_labeled.npz   # full precision, 50k samples
  python -m dpq_jax.main --config=dit_xl_eval:samples=10000 ...    # the 10k protocol
  python -m dpq_jax.main --config=dit_xl_eval:method=pq ...        # 1-bit PQ (dit_xl_1bit), then the same
  python -m dpq_jax.main --config=dit_xl_eval:evaluate_only \
      --config.evaluate.samples=runs/x/samples.npz --config.evaluate.reference=...  # score an existing batch

Arguments: method (fp | pq | vq | rtn, quantized as dit_xl_1bit with k, d, bits, compress),
samples (50000 | 10000 | any), batch (sampling batch, global), evaluate_only, smoke (random weights,
every loop cut to seconds: common.smoke).
"""

import ml_collections

from dpq_jax.configs import common, dit_xl_1bit


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(
    arg, method='fp', k=256, d=8, bits=1, compress=True, samples=50000, batch=64, evaluate_only=False, smoke=False
  )
  if args.method == 'fp':
    config = common.base_config()
    config.stages = ('load', 'sample')
    config.model.name = 'DiT-XL/2'
    config.model.input_size = 32
  else:
    config = dit_xl_1bit.get_config(
      f'method={args.method},k={args.k},d={args.d},bits={args.bits},compress={int(args.compress)}'
    )
  config.name = f'dit_xl_eval_{args.method}_{args.samples // 1000}k'
  config.stages = ('evaluate',) if args.evaluate_only else (*config.stages, 'evaluate')
  config.sample.sampler = 'ddpm'
  config.sample.steps = 250
  config.sample.cfg_scale = 1.5
  config.sample.num_samples = args.samples
  config.sample.batch_size = args.batch
  config.sample.labels = 'random'  # as DiT's sample_ddp.py: uniform random classes
  config.sample.seed = 0
  config.evaluate.image_size = 256
  config.evaluate.batch_size = 64
  return common.smoke(config) if args.smoke else config

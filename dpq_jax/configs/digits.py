r"""The embedded default job (`make demo`): the paper's result on a DiT trained here, on CPU, in minutes.

scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, inside its wheel: no downloads),
a small class-conditional DiT trained with the project's own diffusion loss (stage `train`, cached
in the workdir), and a digit classifier trained alongside for the metrics.

  python -m dpq_jax.main                        # = --config=digits
  python -m dpq_jax.main --config=digits:full   # + equal-bytes and calibrated baselines
  python -m dpq_jax.main --config=digits:tiny   # seconds: the test suite's setting
  python -m dpq_jax.main --config=digits:sweep  # the rate-distortion sweep: every method at 5 byte budgets
  python -m dpq_jax.main --config=digits:curves # calibration-budget curves: quality after 0..300 steps per method

The DiT is 'DiT-2x640x10/4': depth 2, width 640, 10 heads, patch 4 on 8x8x1 images (4 tokens, so a
training step costs about what a 2.8M-parameter patch-2 model's does). Its linear layers have C_out of
640 (attn proj, fc2) to 3840 (adaLN), 2.5x to 15x the K=256 codewords per position of the paper's 1-bit
PQ (K=256, d=8), so per-position codebooks cannot memorise the rows; their raw cost (16 K / C_out bits
per weight in fp16) is 2.8 bits per weight here against 1.6 for DiT-XL/2: compression has to work
harder than on DiT-XL/2, not less.
"""

import ml_collections

from dpq_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, tiny=False, full=False, sweep=False, curves=False, model='DiT-2x640x10/4', steps=1500)
  config = common.base_config()
  config.name = 'digits'
  config.stages = ('train', 'compare')
  config.model.name = args.model
  config.model.init = 'random'  # trained from scratch by stage `train`
  config.model.input_size = 8
  config.model.num_classes = 10
  config.train.steps = args.steps
  config.sample.sampler = 'ddim'
  config.sample.steps = 25
  config.sample.cfg_scale = 1.5
  config.quant.kmeans_iters = 25
  config.quant.dequantize = 'load'  # the rows measure quality; one jitted sampler serves them all
  # Data-aware quantization (issue 15): every quantizer minimises each layer's output error under the input
  # statistics of the trained model on its training digits, guided inputs included (quant.objective='output'),
  # RTN searches its clipping range in that error, and compression allocates bytes by the estimated loss
  # increase (compress.distortion='loss'). The `-w` rows (`:full`) are the same quantizers blind to the data.
  config.quant.objective = 'output'
  config.quant.rtn_clip = 'mse'
  config.compress.distortion = 'loss'
  # ... and PQ/VQ codes are chosen with error feedback across sub-vector positions (quant/feedback.py): the
  # cross-position terms of each layer's output error, which the per-position metric leaves out, are most of it in
  # the adaLN layers (the class signal's path); each channel's output energy restored by its scale. Without it
  # compressed PQ lost the class (log p -0.035, README); the `-pos` rows are the per-position objective.
  config.quant.error_feedback = True
  config.quant.scale_rule = 'output_norm'
  # Every row quantizes the same trained model; index bits per weight in the name.
  config.calibrate.steps = 300
  config.calibrate.batch_size = 64
  config.calibrate.lr = 3e-4
  config.calibrate.warmup = 20
  config.calibrate.checkpoint_every = 100
  config.calibrate.log_every = 10
  # The rows issue 8 asks for; `:full` adds the baselines at equal bytes and calibrated.
  config.compare.rows = (
    'fp', 'rtn-2bit', 'rtn-1bit', 'vq-2bit', 'vq-1bit', 'pq-2bit', 'pq-1bit', 'pq-1bit-compressed',
    'pq-1bit-calibrated',
  )  # fmt: skip
  config.compare.row_defs = {
    'fp': {'stages': ()},
    'rtn-2bit': {'stages': ('quantize',), 'overrides': {'quant': {'method': 'rtn', 'bits': 2}}},
    'rtn-1bit': {'stages': ('quantize',), 'overrides': {'quant': {'method': 'rtn', 'bits': 1}}},
    'vq-2bit': {'stages': ('quantize',), 'overrides': {'quant': {'method': 'vq', 'k': 256, 'd': 4}}},
    'vq-1bit': {'stages': ('quantize',), 'overrides': {'quant': {'method': 'vq', 'k': 256, 'd': 8}}},
    'pq-2bit': {'stages': ('quantize',), 'overrides': {'quant': {'method': 'pq', 'k': 16, 'd': 2}}},
    'pq-1bit': {'stages': ('quantize',), 'overrides': {'quant': {'method': 'pq', 'k': 16, 'd': 4}}},
    # The paper's recipe: large per-position codebooks (K=256, d=8: 1-bit indices), then codebook
    # compression until the quantized layers are 24x smaller than fp32 (codebooks and biases included).
    # Codebook values in 8 bits (one fp16 scale per codebook; the project's own, quant.codebook_dtype) keep
    # about twice the codewords inside the same budget; `:full` has the fp16-codebook rows too.
    'pq-1bit-compressed': {
      'stages': ('quantize', 'compress'),
      'overrides': {
        'quant': {'method': 'pq', 'k': 256, 'd': 8, 'codebook_dtype': 'int8'},
        'compress': {'budget': 24.0},
      },
    },
    # ... then end-to-end calibration of the codebooks on the DDPM loss (assignments recomputed in
    # every forward), on the digits the model was trained on.
    'pq-1bit-calibrated': {
      'stages': ('quantize', 'compress', 'calibrate'),
      'overrides': {
        'quant': {'method': 'pq', 'k': 256, 'd': 8, 'codebook_dtype': 'int8'},
        'compress': {'budget': 24.0},
      },
    },
    'pq-1bit-compressed-fp16': {
      'stages': ('quantize', 'compress'),
      'overrides': {'quant': {'method': 'pq', 'k': 256, 'd': 8}, 'compress': {'budget': 24.0}},
    },
    # ... calibrated with the dynamic assignment re-picking each position's code for W / s alone (as before
    # calibrate.assign_target 'auto': here it keeps error feedback's targets; README).
    'pq-1bit-calibrated-assign-weight': {
      'stages': ('quantize', 'compress', 'calibrate'),
      'overrides': {
        'quant': {'method': 'pq', 'k': 256, 'd': 8, 'codebook_dtype': 'int8'},
        'compress': {'budget': 24.0},
        'calibrate': {'assign_target': 'weight'},
      },
    },
    'pq-1bit-calibrated-fp16': {
      'stages': ('quantize', 'compress', 'calibrate'),
      'overrides': {'quant': {'method': 'pq', 'k': 256, 'd': 8}, 'compress': {'budget': 24.0}},
    },
    'pq16-1bit-calibrated': {
      'stages': ('quantize', 'calibrate'),
      'overrides': {'quant': {'method': 'pq', 'k': 16, 'd': 4}},
    },
    'pq16-1bit-compressed': {
      'stages': ('quantize', 'compress'),
      'overrides': {'quant': {'method': 'pq', 'k': 16, 'd': 4}, 'compress': {'budget': 24.0}},
    },
    # VQ given the bytes of the 24x budget: 1024 codewords of d=8 (1.25 index bits, one small codebook).
    'vq-k1024': {'stages': ('quantize',), 'overrides': {'quant': {'method': 'vq', 'k': 1024, 'd': 8}}},
    # Without the per-output-channel scale (config.quant.channel_scale, on by default): plain k-means.
    'pq-1bit-unscaled': {
      'stages': ('quantize',),
      'overrides': {'quant': {'method': 'pq', 'k': 16, 'd': 4, 'channel_scale': False}},
    },
    'vq-1bit-unscaled': {
      'stages': ('quantize',),
      'overrides': {'quant': {'method': 'vq', 'k': 256, 'd': 8, 'channel_scale': False}},
    },
    'vq-1bit-calibrated': {
      'stages': ('quantize', 'calibrate'),
      'overrides': {'quant': {'method': 'vq', 'k': 256, 'd': 8}},
    },
    'vq-k1024-calibrated': {
      'stages': ('quantize', 'calibrate'),
      'overrides': {'quant': {'method': 'vq', 'k': 1024, 'd': 8}},
    },
  }
  # The same rows with the quantizers blind to the data, as before issue 15 (weight-space k-means, min-max RTN,
  # compression by each layer's relative weight error): `-w`.
  for name in (
    'rtn-1bit',
    'vq-1bit',
    'pq-1bit',
    'pq-1bit-compressed',
    'pq-1bit-calibrated',
    'vq-k1024',
    'vq-1bit-calibrated',
  ):
    row = config.compare.row_defs[name].to_dict()
    row['overrides']['quant'] = dict(row['overrides']['quant'], objective='weight', rtn_clip='minmax',
                                     error_feedback=False, scale_rule='norm')  # fmt: skip
    if 'compress' in row['stages']:
      row['overrides']['compress'] = dict(row['overrides']['compress'], distortion='relative')
    config.compare.row_defs[f'{name}-w'] = row
  # The output objective per sub-vector position, without error feedback (the demo's rows before it): `-pos`.
  for name in ('vq-1bit', 'pq-1bit', 'pq-1bit-compressed', 'pq-1bit-calibrated', 'vq-k1024'):
    row = config.compare.row_defs[name].to_dict()
    row['overrides']['quant'] = dict(row['overrides']['quant'], error_feedback=False, scale_rule='norm')
    config.compare.row_defs[f'{name}-pos'] = row
  # Where the per-position objective lost the class (README, "Error feedback across positions"): K=256 PQ without
  # compression, and the compressed row with the adaLN layers kept in full precision or quantized alone.
  row = config.compare.row_defs['pq-1bit-compressed-pos'].to_dict()
  config.compare.row_defs['pq-k256-pos'] = {'stages': ('quantize',), 'overrides': {'quant': row['overrides']['quant']}}
  blocks = r'blocks_\d+/(attn/(qkv|proj)|mlp/(fc1|fc2))'
  for suffix, pattern in (('ada-fp', blocks), ('ada-only', r'blocks_\d+/adaLN_modulation')):
    config.compare.row_defs[f'pq-1bit-compressed-pos-{suffix}'] = dict(
      row, overrides=dict(row['overrides'], quant=dict(row['overrides']['quant'], pattern=pattern))
    )
  # Output-aware, but the compression budget allocated by each layer's relative output error instead of the
  # estimated loss: loses the class signal (README).
  row = config.compare.row_defs['pq-1bit-compressed'].to_dict()
  row['overrides']['compress'] = dict(row['overrides']['compress'], distortion='relative')
  config.compare.row_defs['pq-1bit-compressed-rel'] = row
  if args.full:
    config.compare.rows += (
      'pq-1bit-compressed-fp16', 'pq-1bit-calibrated-fp16', 'pq-1bit-unscaled', 'vq-1bit-unscaled', 'vq-k1024',
      'pq16-1bit-compressed', 'vq-1bit-calibrated', 'pq16-1bit-calibrated', 'rtn-1bit-w', 'vq-1bit-w', 'pq-1bit-w',
      'pq-1bit-compressed-w', 'pq-1bit-calibrated-w', 'vq-k1024-w', 'pq-1bit-compressed-rel', 'vq-1bit-pos',
      'pq-1bit-pos', 'pq-1bit-compressed-pos', 'vq-k1024-pos',
    )  # fmt: skip
  if args.curves:
    # Calibration-budget curves (README): each calibrated method within the 24x budget scored after 0, 25, 50 and 100
    # of its 300 calibration steps and after the last, from the one run of each row; `-w`: the quantizers (and the
    # dynamic assignment) blind to the data, as before issue 15.
    config.compare.rows = (
      'fp', 'pq-1bit-calibrated', 'pq-1bit-calibrated-w', 'vq-1bit-calibrated', 'vq-1bit-calibrated-w',
      'vq-k1024-calibrated',
    )  # fmt: skip
    config.compare.curve_steps = (0, 25, 50, 100)
  if args.sweep:
    # Every method at effective bits per quantized weight from ~2 to ~0.5 (14x to 58x vs fp32), both objectives,
    # each codebook point also calibrated with the same 100 steps (demo/sweep.py says how each point's bytes are
    # met). RTN cannot spend less than 1 bit + its per-channel scale and offset.
    targets = (2.25, 1.5, 1.125, 0.8, 0.55)
    config.compare.sweep.points = {'rtn': targets[:3], 'vq': targets, 'pq': targets, 'pqc': targets}
    config.calibrate.steps = 100
    config.calibrate.checkpoint_every = 100
  if args.tiny:
    config.model.name = 'DiT-1x64x2/2'
    config.train.steps = 20
    config.train.warmup_steps = 5
    config.train.classifier_steps = 50
    config.quant.kmeans_iters = 3
    config.sample.steps = 3
    config.compare.num_samples = 20
    config.calibrate.steps = 4
    config.calibrate.batch_size = 8
    config.calibrate.warmup = 1
    config.calibrate.checkpoint_every = 2
    config.compare.rows = ('fp', 'rtn-1bit', 'vq-1bit', 'pq-1bit', 'pq-1bit-calibrated')
    if args.curves:  # the compressed row is the calibrated row's step 0
      config.compare.rows = ('fp', 'pq-1bit-compressed', 'pq-1bit-calibrated')
      config.compare.curve_steps = (0, 2)
    for row in ('vq-1bit', 'pq-1bit-compressed', 'pq-1bit-calibrated'):  # seconds, not a 256-codeword seeding
      config.compare.row_defs[row].overrides.quant.update(k=16, d=4)
    if args.sweep:  # one point per method; C_out = 64 rows make codebooks dear, so the points sit higher
      config.compare.sweep.points = {'rtn': (2.5,), 'vq': (1.6,), 'pq': (1.6,), 'pqc': (2.0,)}
      config.compare.sweep.pqc = (16, 4)
      config.compare.sweep.objectives = ('output',)
      config.compare.num_samples = 12
  return config

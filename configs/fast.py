"""Speed run on one GPU, in the manner of airbench: the recipe of `benchmarks/time_to_accuracy.py`.

  python main.py --config=configs/fast.py --workdir=runs/fast \
      --config.data.source=folder --config.data.path=<unpacked cifar10-jpeg>

What it takes from airbench: the dataset resident in device memory (`device` pipeline), a frozen
2x2 patch-whitening first layer, dirac-initialised convolutions, bfloat16 compute, frozen BatchNorm
scales with faster BatchNorm biases, label smoothing 0.2, Nesterov SGD with a linear warmup and
linear decay, an EMA of the weights, alternating flip, test-time augmentation (flip x translate,
`eval.tta`, reported by `--mode=evaluate` and benchmarks/time_to_accuracy.py), and a large batch.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'resnet18'
  config.model.stem = 'whiten'
  config.model.dirac_init = True
  config.augment.train_ops = ('crop',)
  config.augment.alternating_flip = True
  config.data.source = 'folder'
  config.data.pipeline = 'device'
  config.half_precision = True
  config.batch_size = 1024
  config.eval_batch_size = 2000
  config.num_epochs = 12.0
  config.optim.learning_rate = 0.8  # 0.1 per 128 examples; not yet tuned on a GPU.
  config.optim.weight_decay = 5e-4
  config.optim.warmup_epochs = 1.0
  config.optim.schedule = 'onecycle'
  config.optim.label_smoothing = 0.2
  config.optim.bn_scale_frozen = True
  config.optim.bn_bias_lr_multiplier = 4.0
  config.ema_decay = 0.99
  config.eval.tta = 'flip+translate'
  config.eval_every_epochs = 4.0
  config.checkpoint_every_steps = 10_000  # Checkpoints at the evaluations and at the end only.
  config.log_every_steps = 49
  config.steps_per_call = 1  # Until a GPU run of benchmarks/throughput.py shows that scanning several steps pays.
  return config

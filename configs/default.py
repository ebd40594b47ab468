"""Every configuration field, with its default. Other configs import this and override.

Override any field on the command line: `--config.optim.learning_rate=0.05`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet18'  # A preset of resnet_flax.models.PRESETS.
  config.model.max_params = 5_000_000  # Training refuses a model with more trainable parameters.
  config.model.dtype = 'float32'  # Compute dtype: float32 | bfloat16 (parameters stay float32).
  config.model.dropout_rate = 0.0  # Dropout before the classifier.
  config.model.block_dropout_rate = 0.0  # ResNets: dropout inside each block, before its last conv (WRN: 0.3).
  config.model.zero_init_residual = False  # Zero-init each block's last BatchNorm scale.
  config.model.se_ratio = 0.0  # Squeeze-excitation reduction (e.g. 0.25); 0 turns SE off.
  config.model.drop_path_rate = 0.0  # Stochastic depth: drop rate of the last block (linear in depth).
  config.model.stem = (
    ''  # ResNets: cifar | whiten (frozen 2x2 patch whitening, then cifar) | imagenet; '' = the preset's.
  )
  config.model.dirac_init = False  # ResNets: convolutions start as identities on their first channels (airbench).

  config.data = ml_collections.ConfigDict()
  config.data.source = 'tfds'  # tfds | folder | cifar_archive | synthetic
  config.data.name = 'cifar10'  # cifar10 | cifar100 (tfds: any image-classification name).
  config.data.path = ''  # tfds data_dir, image-folder root, or CIFAR archive (file or directory).
  config.data.download = True  # tfds: download and prepare a missing dataset; False never uses the network.
  config.data.pipeline = 'tfdata'  # tfdata (host tf.data) | device (whole dataset in device memory).
  config.data.sampling = 'shuffle'  # shuffle (each epoch a permutation) | balanced (classes equally likely).
  config.data.train_examples = 0  # Train on this many images (class-stratified), before validation_size; 0 all.
  config.data.validation_size = 0  # Hold out this many training images as the validation split (what chooses).
  config.data.image_size = 0  # Images are resized to this square size at decode; 0 = the data's own (one) size.
  config.data.resize = 'shorter_side_then_center_crop'  # squash | shorter_side_then_center_crop (antialiased).
  config.data.cache_dir = ''  # Where decoded image folders are cached ('' = <path>/.resnet_flax_cache).
  config.data.synthetic_train_size = 512  # Synthetic source: training images.
  config.data.synthetic_test_size = 200  # Synthetic source: test images (not a multiple of batches).
  config.data.synthetic_image_size = 32  # Synthetic source: height = width.
  config.data.synthetic_num_classes = 10  # Synthetic source: number of classes.

  config.augment = ml_collections.ConfigDict()
  config.augment.train_ops = ('crop', 'flip')  # In order; 'op' or 'op(arg=value)', ops of resnet_flax.data.augment.OPS.
  config.augment.crop_padding = 4  # Pixels of padding before the random crop.
  config.augment.pad_mode = 'reflect'  # reflect | constant (zeros).
  config.augment.alternating_flip = (
    False  # Flip each image one way in even epochs, the other in odd (airbench); not with 'flip'.
  )
  config.augment.cutout_size = 8  # Side of the square Cutout erases.
  config.augment.randaugment_num_ops = 2  # RandAugment: ops applied to each image (N).
  config.augment.randaugment_magnitude = 9  # RandAugment: strength M, 0..30 as torchvision (timm's 0..10 x 3).
  config.augment.augmix_width = 3  # AugMix: augmentation chains mixed per image.
  config.augment.augmix_depth = -1  # AugMix: ops per chain; -1 draws 1..3 per chain (the paper's default).
  config.augment.augmix_severity = 3  # AugMix: op strength, 1..10 (levels uniform in [0.1, severity]).
  config.augment.augmix_alpha = 1.0  # AugMix: chain weights ~ Dirichlet(alpha), skip weight ~ Beta(alpha, alpha).
  config.augment.mixup_alpha = 0.0  # Mixup: lambda ~ Beta(alpha, alpha) per batch; 0 turns it off.
  config.augment.cutmix_alpha = 0.0  # CutMix: lambda ~ Beta(alpha, alpha) per batch; 0 off; both on: 50/50.
  config.augment.mix_prob = 1.0  # Mixup/CutMix: the chance that a batch is mixed at all.

  config.optim = ml_collections.ConfigDict()
  config.optim.name = (
    'sgd'  # resnet_flax.optim.OPTIMIZERS: sgd | sam (SGD at the sharpness-aware gradient) | adam | adamw | muon.
  )
  config.optim.learning_rate = 0.1  # Peak learning rate, reached after the warmup.
  config.optim.momentum = 0.9  # SGD, SAM, Muon: momentum.
  config.optim.nesterov = True  # SGD, SAM, Muon: Nesterov momentum.
  config.optim.weight_decay = 5e-4  # On conv and dense kernels only (not BN, not biases).
  config.optim.decoupled_weight_decay = False  # SGD, SAM: decay the weights outside the momentum (AdamW always does).
  config.optim.b1 = 0.9  # Adam/AdamW: first-moment decay.
  config.optim.b2 = 0.999  # Adam/AdamW: second-moment decay.
  config.optim.sam_rho = 0.05  # SAM: radius of the ascent step.
  config.optim.sam_adaptive = False  # SAM: adaptive (ASAM) ascent, scaled by |w|.
  config.optim.muon_lr_multiplier = 0.5  # Muon: the hidden conv kernels' rate, x the schedule's (the rest: SGD's).
  config.optim.schedule = (
    'cosine'  # resnet_flax.optim.SCHEDULES, after the warmup: cosine | onecycle (linear to 0) | step.
  )
  config.optim.step_epochs = (100.0, 150.0)  # schedule=step: epochs at which the rate is multiplied ...
  config.optim.step_gamma = 0.1  # ... by this factor.
  config.optim.warmup_epochs = 2.0  # Linear warmup from 0 to the peak.
  config.optim.bn_scale_frozen = False  # Keep BatchNorm scales at their initial value (airbench).
  config.optim.bn_bias_lr_multiplier = 1.0  # BatchNorm biases learn this many times faster (airbench).
  config.optim.label_smoothing = 0.0  # Label smoothing of the cross-entropy.
  config.optim.freeze = 'none'  # none | backbone: train only the classifier, BN statistics fixed (linear probe).
  config.optim.class_weights = 'none'  # Loss weight per class: none | balanced (n / (K n_c)) | "{'cat': 2.0}".

  config.eval = ml_collections.ConfigDict()
  config.eval.checkpoint = 'best'  # evaluate|predict: best (by validation accuracy; else the last) | latest | a step.
  config.eval.tta = 'none'  # Test-time augmentation: none | flip (2 views) | flip+translate (6 views).
  config.eval.evaluators = ''  # evaluate: more report sections (evaluate/evaluators.py), '' | 'name,name'.
  config.eval.attacks = ()  # evaluate: attacks (robust/attacks.py), e.g. "('pgd20', 'apgd_ce', 'apgd_dlr')".
  config.eval.epsilon = 8 / 255  # Attacks: radius, pixels in [0, 1] (tables: L-inf 8/255, L2 0.5); 8/255 allowed.
  config.eval.attack_norm = 'linf'  # Attacks: linf | l2.
  config.eval.attack_examples = 1000  # Attacks: test images attacked (a seeded subset, the same every run); 0 = all.
  config.eval.epsilon_curve = (0.25, 0.5, 2.0)  # Attacks: more radii (x epsilon) for the plot; each is one more attack.
  config.eval.corruptions = ''  # evaluate: CIFAR-10-C corruptions (robust/corruptions.py): '' | all | 'fog,snow'.
  config.eval.corruption_examples = 1000  # Corruptions: test images scored (class-stratified by the seed); 0 = all.
  config.eval.corruption_seed = 0  # Corruptions: chooses the images and draws the corruptions (not config.seed).
  config.eval.corruption_baseline = ''  # Corruptions: a workdir evaluated with them before; CE and mCE relative to it.
  config.eval.corruption_cache_dir = '~/.cache/resnet_flax/corruptions'  # Corruptions: generated sets; '' = no cache.

  config.distill = ml_collections.ConfigDict()  # Knowledge distillation (resnet_flax/train/distill.py).
  config.distill.teacher = ''  # Distil from this run (its workdir or a checkpoint directory); '' = off.
  config.distill.teacher_checkpoint = 'best'  # teacher a workdir: best (as eval.checkpoint chooses) | latest | a step.
  config.distill.alpha = 0.9  # Loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy.
  config.distill.temperature = 4.0  # T, softening both softmaxes (CRD's KD baseline: alpha 0.9, T 4).

  config.augmix = ml_collections.ConfigDict()  # AugMix's consistency loss (resnet_flax/train/consistency.py).
  config.augmix.jsd_weight = 0.0  # CE(clean) + weight x JSD(clean, 2 AugMix views): 3x the step; 0 off (paper: 12).

  config.prune = ml_collections.ConfigDict()  # Gradual magnitude pruning (resnet_flax/compress/prune.py).
  config.prune.sparsity = 0.0  # Fraction of each pruned kernel's weights set to 0 by the end; 0 = off.
  config.prune.start_fraction = 0.0  # Pruning starts this far into the run (a fraction of its steps) ...
  config.prune.end_fraction = 0.75  # ... and reaches prune.sparsity here, on Zhu & Gupta's cubic ramp.
  config.prune.every_steps = 10  # Recompute the masks from the weight magnitudes this often while pruning.
  config.prune.scope = 'hidden'  # hidden (kernels but stem, classifier) | hidden+stem | hidden+classifier | all.

  config.quantize = ml_collections.ConfigDict()  # int8 weights and activations with qwix (compress/quantize.py).
  config.quantize.mode = 'none'  # none | ptq (evaluate/predict a float run in int8) | qat (train through int8).
  config.quantize.stem = True  # Quantize the stem convolution too; False keeps it float (a whitening stem always is).
  config.quantize.classifier = True  # Quantize the classifier too; False keeps it float.

  config.adversarial = ml_collections.ConfigDict()  # Adversarial training, L-inf (resnet_flax/robust/adversarial.py).
  config.adversarial.method = 'none'  # none | fgsm_rs (Wong et al. 2020) | pgd (Madry et al. 2018) | trades (Zhang).
  config.adversarial.epsilon = 8 / 255  # Radius, pixels in [0, 1]; 8/255 is accepted on the command line.
  config.adversarial.step_size = 0.0  # 0: the method's own (fgsm_rs 1.25 epsilon; pgd, trades 2.5 epsilon / steps).
  config.adversarial.steps = 10  # pgd, trades: ascent steps per training step (fgsm_rs takes one).
  config.adversarial.trades_beta = 6.0  # trades: weight of KL(f(clean) || f(adversarial)), Zhang et al.'s 6.
  config.adversarial.guard_drop = 0.2  # Stop when PGD-5 accuracy of a held-out batch falls this below its best; 0 off.

  config.num_epochs = 200.0  # Length of training; fractional epochs are allowed.
  config.batch_size = 512  # Global batch size, over all devices and hosts.
  config.eval_batch_size = 1000  # Global evaluation batch size (the last batch is padded).
  config.seed = 0  # Everything random is a pure function of this seed and the step.
  config.init_from = ''  # Fine-tune: start from the weights of this run (its workdir or a checkpoint directory).
  config.init_from_checkpoint = 'best'  # init_from a workdir: best (as eval.checkpoint chooses) | latest | a step.
  config.half_precision = False  # Shorthand for model.dtype='bfloat16'.
  config.ema_decay = 0.0  # EMA of the weights, evaluated and checkpointed; 0 turns it off (e.g. 0.999).
  config.steps_per_call = (
    1  # Train steps per compiled call (lax.scan), ending at log/eval/save steps and epochs; 1 on CPU.
  )

  config.eval_every_epochs = 1.0  # Evaluate (validation split, else test) this often, and at the end.
  config.early_stopping_patience = 0  # Stop after this many evaluations without a better validation accuracy; 0 off.
  config.checkpoint_every_steps = 500  # Save a checkpoint this often, and at the end.
  config.keep_checkpoints = 2  # Keep this many latest checkpoints (plus the best by validation accuracy).
  config.log_every_steps = 0  # Write training metrics this often; 0: about 50 points per run (run/workdir.py).
  config.skip_nonfinite_updates = False  # Skip (and count) steps with a NaN/inf loss instead of stopping.
  config.check_memory = True  # Refuse before the first step when XLA says the steps need more memory than is free.
  return config

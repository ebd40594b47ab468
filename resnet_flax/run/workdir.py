"""The run contract of a workdir: `run.json`, the resume and writable checks, and the step arithmetic.

`run.json` records what the checkpoints belong to (the model, the classes, the image shape) and
what evaluation needs once the training data is gone (the normalisation, the epoch length),
where a fine-tuned run's starting weights came from (`init_from`), which teacher a distilled run
learns from (`teacher`), the recipe of quantization-aware training (`quantize`) and pruning's
config (`prune`). Its keys are
part of the contract: workdirs of earlier versions must keep working.

`Steps` is the one place where epochs become steps, and `epoch_of` (`epochs_at`, fractional) where
steps become epochs; the trainer, the schedules, the pipelines and the reports read them from here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from resnet_flax.errors import ConfigError

RUN_FILE = 'run.json'
CONFIG_FILE = 'config.json'
LATER_FACTS = ('class_names', 'pixel_mean', 'pixel_std', 'steps_per_epoch')  # Not in the first run.json files.


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Whole batches per epoch: the last partial batch is dropped (a different one each epoch)."""
  return num_examples // batch_size


def epoch_of(step: Any, steps_per_epoch: int) -> Any:
  """The epoch (whole, from 0) that `step` falls in; `step` a Python int or an array of steps (jax, numpy)."""
  return step // steps_per_epoch


def epochs_at(step: Any, steps_per_epoch: int) -> Any:
  """The epochs done at `step`, fractional (what metrics.csv and the training curves count in); an int or array."""
  return step / steps_per_epoch


def _in_steps(epochs: float, per_epoch: int) -> int:
  return round(epochs * per_epoch)


LOG_POINTS = 50  # `log_every_steps=0`: about this many training-metric points per run, however long.


@dataclasses.dataclass(frozen=True)
class Steps:
  """How many steps an epoch, the run and the intervals between evaluations and between logs take."""

  per_epoch: int
  total: int
  eval_every: int
  log_every: int = 1  # `log_every_steps`, or the run's steps / LOG_POINTS when that is 0.

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, num_train_examples: int) -> Steps:
    per_epoch = steps_per_epoch(num_train_examples, config.batch_size)
    if per_epoch == 0:
      raise ConfigError(
        f'batch_size={config.batch_size} is larger than the {num_train_examples} training images; '
        'lower --config.batch_size'
      )
    total = max(1, _in_steps(config.num_epochs, per_epoch))
    eval_every = max(1, _in_steps(config.eval_every_epochs, per_epoch))
    return cls(per_epoch, total, eval_every, config.log_every_steps or max(1, total // LOG_POINTS))

  def at_epoch(self, epochs: float) -> int:
    """The step at which `epochs` (fractional) epochs end."""
    return _in_steps(epochs, self.per_epoch)


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """The contents of run.json."""

  model_name: str
  se_ratio: float
  stem: str
  image_shape: tuple[int, ...]  # H, W, C of the training images.
  class_names: tuple[str, ...]  # Model output i is class_names[i].
  pixel_mean: tuple[float, ...]  # Normalisation of the training images, in [0, 1].
  pixel_std: tuple[float, ...]
  steps_per_epoch: int
  # A fine-tuned run's starting weights, {'path': source workdir, 'step': its checkpoint}; None from scratch.
  # Not in the resume fingerprint: a resumed run continues from its own checkpoints.
  init_from: dict[str, Any] | None = None
  resize: str = 'shorter_side_then_center_crop'  # images.RESIZE_POLICIES: how any image becomes image_shape.
  validation: str = ''  # What the validation split (which chose the best checkpoint) was; '' for none.
  # A distilled run's teacher, {'path': its workdir, 'step': its checkpoint}; None without one. In the
  # resume fingerprint: every step learns from it.
  teacher: dict[str, Any] | None = None
  # Quantization-aware training's recipe (quantize.Recipe: mode, stem, classifier); None for float training.
  # In the resume fingerprint: every step trains through it, and evaluation serves the run in int8 by it.
  quantize: dict[str, Any] | None = None
  # Pruning's config (prune.run_record); None for dense training. In the resume fingerprint: the masks
  # live in the optimizer state, whose layout pruning changes.
  prune: dict[str, Any] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def resume_fingerprint(self) -> dict[str, Any]:
    """What checkpoints must agree with to be resumed, under run.json's keys."""
    return {
      'model.name': self.model_name,
      'model.se_ratio': self.se_ratio,
      'model.stem': self.stem,
      'image_shape': list(self.image_shape),
      'num_classes': self.num_classes,
      'class_names': list(self.class_names),
      'teacher': self.teacher,
      'quantize': self.quantize,
      'prune': self.prune,
    }

  def to_json(self) -> dict[str, Any]:
    facts = {'pixel_mean': list(self.pixel_mean), 'pixel_std': list(self.pixel_std)}
    later = {'init_from': self.init_from, 'resize': self.resize, 'validation': self.validation}
    return {**self.resume_fingerprint(), **facts, 'steps_per_epoch': self.steps_per_epoch, **later}

  @classmethod
  def from_json(cls, saved: dict[str, Any]) -> RunInfo:
    return cls(
      model_name=saved['model.name'],
      se_ratio=saved['model.se_ratio'],
      stem=saved['model.stem'],
      image_shape=tuple(saved['image_shape']),
      class_names=tuple(saved['class_names']),
      pixel_mean=tuple(saved['pixel_mean']),
      pixel_std=tuple(saved['pixel_std']),
      steps_per_epoch=saved['steps_per_epoch'],
      # Absent from the run.json of earlier versions (which never resized, and never validated but on request).
      init_from=saved.get('init_from'),
      resize=saved.get('resize', cls.resize),
      validation=saved.get('validation', cls.validation),
      teacher=saved.get('teacher'),
      quantize=saved.get('quantize'),
      prune=saved.get('prune'),
    )

  @classmethod
  def load(cls, workdir: str, derive_missing_facts: Callable[[dict[str, Any]], dict[str, Any]]) -> RunInfo:
    """The run.json of `workdir`. The first versions wrote no class names, normalisation or epoch
    length: `derive_missing_facts(saved)` supplies them (from the training data) when they are absent."""
    saved = read_run_json(workdir)
    if not all(key in saved for key in LATER_FACTS):
      logging.info('%s lacks %s: deriving them from the training data', RUN_FILE, ', '.join(LATER_FACTS))
      saved = {**saved, **derive_missing_facts(saved)}
    return cls.from_json(saved)

  def save(self, workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes run.json and config.json (the config of the latest run); process 0 only."""
    if jax.process_index() != 0:
      return
    with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, RUN_FILE), 'w') as f:
      json.dump(self.to_json(), f, indent=2)


def read_run_json(workdir: str) -> dict[str, Any]:
  """The run.json of `workdir` as saved, its raw keys ({} where there is none): the one reader of the file
  (`RunInfo.load` turns it into a `RunInfo`)."""
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def check_resumable(workdir: str, run: RunInfo) -> None:
  """Refuses to resume a workdir whose checkpoints were made for another model, data shape, teacher,
  quantization or pruning."""
  saved = read_run_json(workdir)
  if not saved:
    return
  changed = [f'{k}: {saved.get(k)} -> {v}' for k, v in run.resume_fingerprint().items() if saved.get(k) != v]
  if changed:
    raise ConfigError(
      f'workdir {workdir} holds checkpoints of another model, data shape, teacher, quantization or pruning '
      f'({"; ".join(changed)}); use a new --workdir or restore those values'
    )


def check_writable(workdir: str) -> None:
  """Fails early, leaving no trace, if `workdir` (or the folder it would be created in) is not writable."""
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      raise NotADirectoryError(f'{existing} is a file')
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise ConfigError(f'workdir {workdir} is not writable ({e}); choose another --workdir') from e

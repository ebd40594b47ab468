"""Step extensions: what a recipe adds to the plain train step, declared as hooks.

Adversarial training, distillation, pruning, quantization-aware training and AugMix's consistency loss each
change the step in a few places; each is a `StepExtension` that overrides only the hooks it needs, and
`train.step.train_step` is the plain step plus a fold over the active ones, in `REGISTRY` order. The hooks
come from what they do:

| hook             | when                                         | who                                    |
|------------------|----------------------------------------------|----------------------------------------|
| `check_config`   | before any work, for every registered one    | all: their fields' contradictions      |
| `create`         | set-up: the extension, or None when off       | all                                    |
| `wrap_model`     | set-up                                       | QAT (qwix's fake quantization)         |
| `wrap_optimizer` | set-up; its state is checkpointed with it    | pruning (the masks)                    |
| `run_record`     | set-up: run.json's fields of it              | distillation, pruning, QAT             |
| `arguments`      | set-up: values the compiled step takes       | adversarial (ε, step), distillation, JSD weight |
| `fingerprint`    | set-up: what keys its program beyond config  | distillation (the teacher), pruning (schedule) |
| `prepare`        | in the step, before the loss; not differentiated | adversarial (the attack), distillation (teacher logits), AugMix (the views) |
| `loss`           | inside the differentiated loss               | distillation (replaces it), TRADES, AugMix's JSD (add to it) |
| `after_update`   | after the optimizer's update                 | pruning (masks the EMA)                |

Hyperparameters reach the compiled step as arguments (`arguments`, replicated, never donated), not as
constants closed over: the same program serves any value of them. An extension names the config fields they
come from (`traced_fields`): left out of the compiled step's key (`train.step.StepSpec`), runs that differ
only in them share the program; what else tells two extensions' programs apart is its `fingerprint`. Values
are computed on the host in float64 and rounded once to float32, as Python constants were, so the step
computes the same bits with them as arguments.

Written by hand: optax composes gradient transformations and flax composes modules, but no maintained
library composes what a train step does around its loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import ml_collections

Forward = Callable[[Any, jax.Array], tuple[jax.Array, Any]]  # (variables, images) -> (logits, mutated batch_stats)


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What every hook of one step may read."""

  state: Any  # The `train.step.TrainState` the step starts from.
  forward: Forward  # Training's forward pass (train mode, dropout keyed by the step).
  apply: Callable[..., Any]  # The model's `apply` (inference mode with train=False).
  key: jax.Array  # The step's key: an extension draws from `jax.random.fold_in(key, <its own stream>)`.
  mean: Any  # The normalisation the images carry, per channel.
  std: Any


class Batch(NamedTuple):
  """The normalised, augmented (and mixed) images of a step and their [B, num_classes] targets."""

  images: jax.Array
  targets: jax.Array


class Loss(NamedTuple):
  """The loss of one forward pass, and what it came from."""

  value: jax.Array  # The batch mean.
  logits: jax.Array
  params: Any  # The parameters being differentiated.
  updates: dict[str, Any]  # {'batch_stats': ...} as the forward pass mutated them.


class StepExtension:
  """A recipe's changes to the train step. Every hook is a no-op here; subclasses override theirs."""

  name: ClassVar[str]  # Its key in `REGISTRY` and in the step's arguments.
  traced_fields: ClassVar[tuple[str, ...]] = ()  # Config fields that reach the step only through `arguments`.

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for this recipe's fields that contradict each other or the rest of the config."""

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, train_split: Any, steps: Any) -> StepExtension | None:
    """The extension `config` asks for, or None. `train_split` is a `data.ImageData`, `steps` a `run.workdir.Steps`."""
    raise NotImplementedError

  def wrap_model(self, model: Any) -> Any:
    return model

  def wrap_optimizer(self, tx: Any) -> Any:
    return tx

  def run_record(self) -> dict[str, Any]:
    """run.json's fields (`run.workdir.RunInfo`) this extension sets."""
    return {}

  def fingerprint(self) -> Any:
    """What, beyond the config without `traced_fields`, makes this extension's program: its run.json record
    (a teacher's path and step), by default. Equal fingerprints of equal configs share a compiled step."""
    return repr(sorted(self.run_record().items()))

  def arguments(self) -> Any:
    """A pytree the compiled step receives as `args` in the hooks below."""
    return {}

  def prepare(self, args: Any, context: StepContext, batch: Batch) -> tuple[Batch, Any]:
    """The batch the loss sees, and what this extension's `loss` needs of it (its aux)."""
    return batch, None

  def loss(self, args: Any, context: StepContext, aux: Any, loss: Loss) -> Loss:
    """`loss` replaced or added to (its value; its updates when the hook runs the model again)."""
    return loss

  def after_update(self, args: Any, state: Any) -> Any:
    """The state after the optimizer's update, changed."""
    return state


REGISTRY: dict[str, type[StepExtension]] = {}


def register(extension: type[StepExtension]) -> type[StepExtension]:
  """Adds `extension` to the fold, after those registered before it; usable as a class decorator."""
  REGISTRY[extension.name] = extension
  return extension


def create_all(config: ml_collections.ConfigDict, train_split: Any, steps: Any) -> tuple[StepExtension, ...]:
  """The extensions `config` asks for, in `REGISTRY` order."""
  created = (extension.create(config, train_split, steps) for extension in REGISTRY.values())
  return tuple(extension for extension in created if extension is not None)


def check_all(config: ml_collections.ConfigDict) -> None:
  for extension in REGISTRY.values():
    extension.check_config(config)


def fold(extensions: Sequence[StepExtension], hook: str, value: Any) -> Any:
  """`value` through `hook` of each extension in turn: the set-up hooks `wrap_model` and `wrap_optimizer`."""
  for extension in extensions:
    value = getattr(extension, hook)(value)
  return value

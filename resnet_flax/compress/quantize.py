"""int8 quantization with qwix (google/qwix): post-training (PTQ) and quantization-aware training (QAT).

What is quantized. Every convolution and dense layer computes int8 x int8 with int32 accumulation:
its kernel in int8, symmetric, one float32 scale per output channel (absmax); its input in int8,
symmetric, one scale per example taken from that example's own absmax when it runs (dynamic range:
no calibration data, and an image's prediction never depends on the rest of its batch). That covers
the residual blocks, their projection shortcuts, squeeze-excitation gates and, by default, the stem
convolution and the classifier too: at int8 they cost no measurable accuracy (resnet_tiny on CIFAR-10:
every layer in int8 70.02%, stem and classifier in float 69.95%, float 69.92%), and `quantize.stem` /
`quantize.classifier` = False keep them float, as low-bit schemes do with the first and last layers
(they hold few weights that every feature, or every class, depends on). A whitening stem
(`layers.PatchWhitening`) always stays float: a fixed transform of the pixels, never trained (qwix
could not tell its frozen kernel for a weight anyway). BatchNorm (not folded into the convolutions),
ReLU, pooling and the residual additions stay float32.
int4 is not offered: XLA:CPU fails to compile qwix's int4 convolutions.

PTQ (`quantize.mode=ptq`): evaluation (`--mode=evaluate`, `--mode=predict`, `resnet_flax.load(...,
quantize='ptq')`) converts the float weights of any trained run (`serving_model`): post-training
quantization with per-channel weight scales (Krishnamoorthi 2018, "Quantizing deep convolutional
networks for efficient inference: a whitepaper").

QAT (`quantize.mode=qat`, usually a fine-tune from `init_from`): training runs the model under qwix's
QtProvider (the step extension `QuantizationAwareTraining`), whose forward pass is the int8 model's
(the same quantization, the same integer convolutions: identical logits in float32 compute) and whose
backward pass treats the rounding as the identity (the straight-through estimator; Jacob et al. 2018,
"Quantization and training of neural networks for efficient integer-arithmetic-only inference"). The weights stay
float32, in the tree float training has, so init_from, the EMA, pruning masks and exact resume work
unchanged (no statistic is collected: activations are scaled dynamically). run.json records the
recipe (`Recipe`) in the resume fingerprint, and evaluation serves such a run through
`serving_model` like PTQ: in int8, computing what training evaluated.

The served model's report goes to a directory labelled `int8-<mode>`, never over the float one, with its
parameter bytes (`served_bytes`) against float32's. Pitfall (DESIGN.md, model-optimization#599):
int8 is not faster on every CPU; XLA:CPU runs these int8 convolutions slower than float32 ones (about
twice the time for resnet_tiny): this saves memory and bytes to ship, not CPU time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import qwix
from absl import logging

from resnet_flax import models, step_extensions
from resnet_flax.errors import ConfigError
from resnet_flax.models import layers, trained

MODES = ('none', 'ptq', 'qat')  # `quantize.mode`.


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How a model is quantized: the `quantize` config section, and what run.json records of QAT."""

  mode: str  # ptq | qat.
  stem: bool = True  # Whether the stem convolution is quantized.
  classifier: bool = True  # Whether the classifier is quantized.

  @classmethod
  def of(cls, quantize_config: ml_collections.ConfigDict) -> Recipe:
    return cls(quantize_config.mode, quantize_config.stem, quantize_config.classifier)

  @property
  def float_layers(self) -> tuple[str, ...]:
    """The top-level modules whose convolutions and dense layers stay float."""
    return (layers.WHITENING,) + (() if self.stem else (models.STEM,)) + (() if self.classifier else (models.HEAD,))

  def rules(self) -> list[qwix.QuantizationRule]:
    """qwix's rules, the first match of a module path winning: a rule without a type leaves it float."""
    return [
      qwix.QuantizationRule(module_path='|'.join(self.float_layers)),
      # Weights and activations alike: qwix's int8 convolutions need both of one type.
      qwix.QuantizationRule(module_path='.*', weight_qtype=jnp.int8, act_qtype=jnp.int8),
    ]


def check_config(config: ml_collections.ConfigDict) -> None:
  """Options that would do nothing are refused (config_checks validates each field's value)."""
  quantize = config.quantize
  if quantize.mode != 'none':
    return
  for field in ('stem', 'classifier'):
    if not quantize[field]:
      raise ConfigError(
        f'--config.quantize.{field}=False does nothing with quantize.mode=none (nothing is quantized); '
        'leave it at True or set --config.quantize.mode=ptq or qat'
      )


# Training.


@step_extensions.register
class QuantizationAwareTraining(step_extensions.StepExtension):
  """The step extension of `quantize.mode=qat`: the model trains under qwix's fake quantization."""

  name = 'qat'

  def __init__(self, quantize_config: ml_collections.ConfigDict):
    self.recipe = Recipe.of(quantize_config)

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    check_config(config)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, train_split: Any, steps: Any) -> QuantizationAwareTraining | None:
    if config.quantize.mode == 'ptq':
      raise ConfigError(
        '--config.quantize.mode=ptq quantizes a trained run when it is evaluated (--mode=evaluate or predict), '
        'not training: train with quantize.mode=none, or qat for quantization-aware training'
      )
    return cls(config.quantize) if config.quantize.mode == 'qat' else None

  def wrap_model(self, model: nn.Module) -> nn.Module:
    return qwix.quantize_model(model, qwix.QtProvider(self.recipe.rules()))

  def run_record(self) -> dict[str, Any]:
    """run.json's record: the recipe evaluation serves the run by (`served_recipe`)."""
    return {'quantize': dataclasses.asdict(self.recipe)}


# Serving.


def served_recipe(quantize_config: ml_collections.ConfigDict, trained: dict[str, Any] | None) -> Recipe | None:
  """How a run is served: as its QAT recipe (`trained`, from run.json) says, whatever the mode asked
  for; else in int8 when `quantize_config` asks for PTQ; else float (None)."""
  requested = Recipe.of(quantize_config)
  if requested.mode not in MODES:
    raise ConfigError(f'quantize={requested.mode!r} is invalid: choose one of {", ".join(MODES)}')
  if trained is not None:
    recipe = Recipe(**trained)
    if requested.mode != 'none' and dataclasses.replace(requested, mode=recipe.mode) != recipe:
      raise ConfigError(
        f'the run was trained with quantization-aware training (quantize.stem={recipe.stem}, '
        f'quantize.classifier={recipe.classifier}) and is served as it was trained: leave those fields as they were'
      )
    return recipe
  if requested.mode == 'qat':
    raise ConfigError(
      '--config.quantize.mode=qat: the run was trained without quantization-aware training; evaluate it in int8 '
      'with --config.quantize.mode=ptq, or fine-tune it with qat into a new workdir (--config.init_from=<its workdir>)'
    )
  return requested if requested.mode == 'ptq' else None


def serve(restored: trained.Restored, quantize_config: ml_collections.ConfigDict) -> trained.Restored:
  """`restored` (float, of `trained.restore`) as it serves under `quantize_config` (the `quantize` section
  of the config that evaluates or serves): in int8 for PTQ and for a QAT run (`served_recipe`), else as is."""
  recipe = served_recipe(quantize_config, restored.run.info.quantize)
  model, variables = serving_model(restored.model, restored.variables, restored.run.info.image_shape, recipe)
  return dataclasses.replace(restored, model=model, variables=variables, quantized=recipe)


def serving_model(
  model: nn.Module, variables: dict[str, Any], image_shape: Sequence[int], recipe: Recipe | None
) -> tuple[nn.Module, dict[str, Any]]:
  """The model and variables that serve float `model` with `variables` ({'params', 'batch_stats'},
  float32) as `recipe` says: int8 kernels (qwix QArrays, in `params`) under qwix's PtqProvider, or
  both unchanged for None. `image_shape` (H, W, C) shapes the abstract initialisation that tells qwix
  how each kernel is quantized."""
  if recipe is None:
    return model, variables
  int8_model = qwix.quantize_model(model, qwix.PtqProvider(recipe.rules()))
  abstract = models.init_variables(int8_model, image_shape)
  served = {**variables, 'params': qwix.quantize_params(variables['params'], abstract['params'])}
  described = summary(served, recipe)
  logging.info(
    'Serving in int8 (%s): %d layers in int8, in float: %s; parameters %s bytes, %.1f%% of float32',
    recipe.mode,
    len(described['int8_layers']),
    ', '.join(described['float_layers']) or 'none',
    f'{described["parameter_bytes"]:,}',
    100 * described['parameter_bytes'] / described['float32_parameter_bytes'],
  )
  return int8_model, served


def stored_values(tree: dict[str, Any]) -> dict[str, Any]:
  """`tree` (served variables, or their params) with each int8 kernel replaced by its stored int8 values,
  its scales aside: the arrays whose zeros, dtypes and sizes are the served model's."""
  flat = flax.traverse_util.flatten_dict(tree)  # A quantized kernel (qwix's WithAux) is one leaf here.
  return flax.traverse_util.unflatten_dict({path: jax.tree.leaves(leaf)[0] for path, leaf in flat.items()})


def kernel_dtypes(variables: dict[str, Any]) -> dict[str, str]:
  """'/'-joined path of each convolution and dense layer -> the dtype its kernel is stored in."""
  flat = flax.traverse_util.flatten_dict(stored_values(variables['params']))
  return {'/'.join(path[:-1]): leaf.dtype.name for path, leaf in flat.items() if path[-1] == 'kernel'}


def served_bytes(variables: dict[str, Any]) -> int:
  """Bytes of every array a served model holds: its kernels (int8 and their float32 scales where quantized),
  biases, BatchNorm parameters and statistics."""
  return sum(x.nbytes for x in jax.tree.leaves(variables))


def float32_bytes(variables: dict[str, Any]) -> int:
  """`served_bytes` of the same model in float32: 4 bytes per value, no scales."""
  return sum(4 * x.size for x in jax.tree.leaves(stored_values(variables)))


def summary(variables: dict[str, Any], recipe: Recipe | None) -> dict[str, Any]:
  """What an evaluation report says of the served weights: how they are stored, and their bytes."""
  dtypes = kernel_dtypes(variables)
  stored = {
    'mode': 'none' if recipe is None else recipe.mode,
    'parameter_bytes': served_bytes(variables),
    'float32_parameter_bytes': float32_bytes(variables),
    'int8_layers': [path for path, dtype in dtypes.items() if dtype == 'int8'],
    'float_layers': [path for path, dtype in dtypes.items() if dtype != 'int8'],
  }
  if recipe is None:
    return stored
  return {
    **stored,
    'weights': 'int8, symmetric, a float32 scale per output channel',
    'activations': 'int8, symmetric, a float32 scale per example from its absmax (dynamic range)',
  }

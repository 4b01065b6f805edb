"""The lora-jax command: the count plan, and one-line errors with exit code 2."""

import subprocess
import sys

import pytest

from _utils import run_cli
from lora_jax.app import cli


def test_count_prints_plan_and_peft_line(capsys):
  assert cli.main(["count", "--model", "llama-2-7b", "--rank", "8", "--targets", "q,v"]) == 0
  out = capsys.readouterr().out
  assert "params/model/layers/self_attn/q_proj/kernel  32x4096x4096  lio   8" in out
  # 2 kernels x 32 layers x r (4096 + 4096); total = 6,738,415,616 + trainable
  trainable = 2 * 32 * 8 * (4096 + 4096)
  assert f"trainable params: {trainable:,d} || all params: {6_738_415_616 + trainable:,d}" in out


def test_count_summary_and_aliases(capsys):
  assert cli.main(["count", "--model", "gpt2", "--targets", "qkv", "--rank", "8",
                   "--summary"]) == 0
  assert capsys.readouterr().out.startswith(f"trainable params: {12 * 8 * (768 + 2304):,d} ||")


def test_default_targets_follow_the_layout(capsys):
  assert cli.main(["count", "--model", "gpt2", "--summary"]) == 0  # fused: c_attn
  assert capsys.readouterr().out.startswith(f"trainable params: {12 * 8 * (768 + 2304):,d} ||")
  assert cli.main(["count", "--model", "gpt2-medium", "--separate-qkv", "--rank", "4",
                   "--summary"]) == 0  # the LoRA paper's Wq, Wv: 2 x 24 x 4 x (1024 + 1024)
  assert capsys.readouterr().out.startswith(f"trainable params: {2 * 24 * 4 * 2048:,d} ||")


BAD_COUNT = [
    (["count", "--model", "llama-9b"], "lora-jax count: unknown model config 'llama-9b'; "
                                       "choose one of llama-2-7b"),
    (["count", "--model", "gpt2", "--targets", "qkv,zzz"], "target pattern 'zzz' matched no "
                                                           "parameter"),
    (["count", "--model", "gpt2", "--rank", "0"], "rank must be an integer >= 1"),
    (["count", "--model", "gpt2", "--rank", "x"], "argument --rank: invalid int value"),
    (["count"], "the following arguments are required: --model"),
    (["count", "--model", "gpt2", "--targets", "q,v"], "gpt2 has a fused c_attn projection"),
    (["count", "--model", "gpt-3-175b", "--targets", "qkv"], "use q,k,v instead of 'qkv'"),
    (["count", "--model", "llama-2-7b", "--separate-qkv"], "--separate-qkv applies to the gpt2 "
                                                           "family only, not llama-2-7b"),
    (["count", "--model", "gpt2", "--targets", "x{4294967296}"], "is not a valid regular "
                                                                 "expression"),
    (["fit"], "argument command: invalid choice"),
]


@pytest.mark.parametrize("argv,message", BAD_COUNT)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
  code, out, err = run_cli(capsys, *argv)
  assert code == 2 and out == ""
  assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [BAD_COUNT[0], BAD_COUNT[3]])
def test_bad_input_to_the_command_is_one_line_and_exit_2(argv, message):
  """The same through the installed entry point, a process of its own."""
  done = subprocess.run([sys.executable, "-m", "lora_jax.app.cli", *argv], capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 2
  assert done.stdout == ""
  assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
  assert "Traceback" not in done.stderr


def test_train_flags_come_from_the_options_and_override_a_config_file(tmp_path):
  import dataclasses

  from lora_jax.app.classify import ClassifyOptions
  parser = cli._parser()
  train = parser._subparsers._group_actions[0].choices["train"]
  flags = {a.option_strings[0] for a in train._actions if a.option_strings}
  assert {cli.flag(f.name) for f in dataclasses.fields(ClassifyOptions)} <= flags
  (tmp_path / "run.yaml").write_text("rank: 4\nsteps: 12\ntargets: q,k,v\nfull: false\n"
                                     "lr: 1e-3\n")  # YAML 1.1 reads 1e-3 as text
  (tmp_path / "run.json").write_text('{"rank": 2, "lora-plus-ratio": 4}')
  args = parser.parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--steps", "3"])
  o = cli.options_from(args, ClassifyOptions)
  assert (o.rank, o.steps, o.targets, o.batch_size) == (4, 3, "q,k,v", 32)  # the flag wins
  assert o.lr == 1e-3
  o = cli.options_from(parser.parse_args(["train", "--config", str(tmp_path / "run.json")]),
                       ClassifyOptions)
  assert (o.rank, o.lora_plus_ratio) == (2, 4)
  assert cli.options_from(parser.parse_args(["train", "--full"]), ClassifyOptions).full


def test_options_errors_are_shown_as_flags(tmp_path, capsys):
  (tmp_path / "bad.json").write_text('{"eval_every": 0}')
  assert cli.main(["train", "--config", str(tmp_path / "bad.json"), "--out",
                   str(tmp_path / "r")]) == 2
  assert capsys.readouterr().err == ("lora-jax train: --eval-every must be an integer > 0, "
                                     "got 0.\n")

"""Model sources (lora_jax.models.sources): a listing from the headers alone, and each tensor or
slice read from the memory-mapped file equal to the whole-file readers' (safetensors.numpy's
load_file, the gguf package's dequantization) bit for bit; damaged checkpoints refused by name."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from _llm import write_gguf
from lora_jax.models import gguf, sources, weights

RNG = np.random.default_rng(0)
TENSORS = {
    "model.embed_tokens.weight": RNG.normal(size=(16, 8)).astype(ml_dtypes.bfloat16),
    "model.layers.0.self_attn.q_proj.weight": RNG.normal(size=(8, 8)).astype(np.float16),
    "model.layers.1.self_attn.q_proj.weight": RNG.normal(size=(8, 8)).astype(np.float32),
    "model.norm.weight": np.ones(8, np.float32),
}
SHARDS = {"model-00001-of-00002.safetensors": list(TENSORS)[:2],
          "model-00002-of-00002.safetensors": list(TENSORS)[2:]}


def _sharded(folder):
  """A folder as save_pretrained writes a sharded checkpoint: two shards and the index."""
  folder.mkdir(exist_ok=True)
  for file, names in SHARDS.items():
    save_file({n: TENSORS[n] for n in names}, str(folder / file), metadata={"format": "pt"})
  weight_map = {n: file for file, names in SHARDS.items() for n in names}
  (folder / weights.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {},
                                                             "weight_map": weight_map}))
  return folder


def test_a_sharded_folder_lists_from_headers_and_reads_what_load_file_reads(tmp_path):
  folder = _sharded(tmp_path / "m")
  source = sources.open_source(folder)
  listed = source.tensors()
  assert {n: (t.shape, t.dtype, t.file.name) for n, t in listed.items()} == {
      n: (TENSORS[n].shape, {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[
          str(TENSORS[n].dtype)], file) for file, names in SHARDS.items() for n in names}
  whole = {}
  for file in SHARDS:
    whole.update(load_file(folder / file))
  got = sources.read_all(source)
  assert got.keys() == whole.keys()
  for name, want in whole.items():
    assert got[name].dtype == want.dtype and got[name].tobytes() == want.tobytes()
  rows = (slice(3, 11), slice(None))
  part = source.read("model.embed_tokens.weight", rows)
  assert part.dtype == ml_dtypes.bfloat16 and part.tobytes() == whole[
      "model.embed_tokens.weight"][rows].tobytes()
  cols = (slice(None), slice(2, 6))
  np.testing.assert_array_equal(source.read("model.layers.1.self_attn.q_proj.weight", cols),
                                TENSORS["model.layers.1.self_attn.q_proj.weight"][cols])


def test_a_single_file_and_a_folder_with_model_safetensors_read_alike(tmp_path):
  save_file(TENSORS, str(tmp_path / weights.SAFETENSORS))
  by_folder = sources.read_all(sources.open_source(tmp_path))
  by_file = sources.read_all(sources.open_source(tmp_path / weights.SAFETENSORS))
  for name, want in TENSORS.items():
    assert by_folder[name].tobytes() == by_file[name].tobytes() == want.tobytes()


def test_damaged_checkpoints_are_refused_by_name(tmp_path):
  folder = _sharded(tmp_path / "m")
  source = sources.open_source(folder)
  with pytest.raises(KeyError, match=r"holds no tensor 'lm_head.weight'; it holds"):
    source.read("lm_head.weight")
  second = folder / "model-00002-of-00002.safetensors"
  data = second.read_bytes()
  second.write_bytes(data[:-16])
  with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors is not a complete "
                                       r"safetensors file \(.*\); download or copy it again"):
    sources.open_source(folder)
  save_file({"model.norm.weight": TENSORS["model.norm.weight"]}, str(second))
  with pytest.raises(ValueError, match=r"lacks model.layers.1.self_attn.q_proj.weight, which "
                                       r"the checkpoint's model.safetensors.index.json places"):
    sources.open_source(folder)
  second.unlink()
  with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002.safetensors: no such file, "
                                              r"though model.safetensors.index.json names it"):
    sources.open_source(folder)
  with pytest.raises(FileNotFoundError, match=r"nothing: no such file or folder; pass a Hugging "
                                              r"Face model folder, a .safetensors file or a "
                                              r".gguf file"):
    sources.open_source(tmp_path / "nothing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"model.safetensors: no such file \(nor "
                                              r"model.safetensors.index.json\)"):
    sources.open_source(tmp_path / "empty")


def test_a_gguf_file_lists_in_hugging_faces_order_and_reads_what_gguf_dequantizes(tmp_path):
  import gguf as gguf_package

  w = RNG.normal(size=(4, 64)).astype(np.float32)  # (out, in): GGUF stores it (in, out)-first
  quantized = gguf_package.quants.quantize(w, gguf_package.GGMLQuantizationType.Q8_0)
  path = write_gguf(tmp_path / "t.gguf", "llama", {"norm.weight": np.ones(8, np.float32)})
  writer = gguf_package.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
  writer.add_tensor("blk.0.attn_q.weight", quantized, raw_shape=quantized.shape,
                    raw_dtype=gguf_package.GGMLQuantizationType.Q8_0)
  writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  assert sources.open_source(path).tensors()["norm.weight"].shape == (8,)
  source = sources.open_source(tmp_path / "q.gguf")
  listed = source.tensors()
  assert (listed["blk.0.attn_q.weight"].shape, listed["blk.0.attn_q.weight"].dtype) == (
      (4, 64), "Q8_0")
  want = gguf_package.quants.dequantize(quantized, gguf_package.GGMLQuantizationType.Q8_0)
  np.testing.assert_array_equal(source.read("blk.0.attn_q.weight"), want)
  np.testing.assert_array_equal(source.read("blk.0.attn_q.weight", (slice(1, 3),)), want[1:3])
  np.testing.assert_array_equal(source.read("blk.0.attn_q.weight"),
                                gguf.dequantize(gguf.read(tmp_path / "q.gguf"),
                                                "blk.0.attn_q.weight"))


# ----------------------------------------------------------------------- assembling in place

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


class _Counting:
  """A source that counts the elements each read returns, by tensor."""

  def __init__(self, inner):
    self.inner, self.path, self.read_elements = inner, inner.path, {}

  def tensors(self):
    return self.inner.tensors()

  def read(self, name, index=None):
    value = self.inner.read(name, index)
    self.read_elements[name] = self.read_elements.get(name, 0) + value.size
    return value


def _saved_llama(folder, *, dtype):
  import jax

  from lora_jax.models import llama, llama_io
  config = llama.LlamaConfig(**LLAMA)
  params = jax.jit(llama.LlamaForCausalLM(config).init)(jax.random.key(0),
                                                         np.zeros((1, 4), np.int32))
  return llama_io.save(folder, config, params, dtype=dtype)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("stored, loaded", [("bfloat16", "bfloat16"), ("bfloat16", "float32"),
                                            ("float32", "float32")])
def test_params_from_a_source_equal_the_whole_file_loaders_bit_for_bit(tmp_path, scan, stored,
                                                                        loaded):
  import jax

  from lora_jax.models import llama_io
  from lora_jax.models.llama import FAMILY
  folder = _saved_llama(tmp_path / "m", dtype=stored)
  config = llama_io.config_from_hf(folder, dtype=loaded, param_dtype=loaded, scan_layers=scan)
  # the whole-file path: every tensor in memory, then cast, transposed and stacked
  want = llama_io.params_from_tensors(load_file(folder / weights.SAFETENSORS), config)
  source = _Counting(sources.open_source(folder))
  got = weights.params_from_source(source, FAMILY, llama_io.param_tree(config),
                                   **weights.layout(config), dtype=np.dtype(loaded))
  loaded_by_load = llama_io.load(folder, dtype=loaded, scan_layers=scan)[1]  # through a source
  for tree in (got, loaded_by_load):
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(want)):
      assert g.dtype == w.dtype and np.asarray(g).tobytes() == np.asarray(w).tobytes()
  listed = source.tensors()
  assert source.read_elements == {n: int(np.prod(t.shape)) for n, t in listed.items()}  # once


def test_params_from_a_source_are_made_in_their_shardings_reading_each_part_once(tmp_path):
  from lora_jax import sharding
  from lora_jax.models import llama_io
  from lora_jax.models.llama import FAMILY
  from lora_jax.targets import leaves_by_path
  folder = _saved_llama(tmp_path / "m", dtype="float32")
  config = llama_io.config_from_hf(folder)
  want = llama_io.params_from_tensors(load_file(folder / weights.SAFETENSORS), config)
  mesh = sharding.mesh("2x4")
  tree = llama_io.param_tree(config)
  specs = sharding.tensor_parallel_specs({"params": tree}, FAMILY.partition_rules, mesh=mesh,
                                         fsdp=True)
  shardings = leaves_by_path(sharding.named_shardings(specs, mesh)["params"])
  source = _Counting(sources.open_source(folder))
  got = weights.params_from_source(source, FAMILY, tree, **weights.layout(config),
                                   shardings=shardings)
  flat_got, flat_want = (leaves_by_path(t["params"]) for t in (got, want))
  split = 0
  for path, leaf in flat_got.items():
    assert leaf.sharding == shardings[path]
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_want[path]))
    split += len({str(s.index) for s in leaf.addressable_shards}) > 1
  assert split >= 8  # the embedding, the head and every projection are split over the mesh
  # each byte once: a part several devices hold (the replicated norms) is read once
  assert source.read_elements == {n: int(np.prod(t.shape)) for n, t in source.tensors().items()}

"""Hugging Face checkpoints (pagedjax.weights.hf): tiny checkpoints written here, one per architecture.

Each is checked against an independent numpy forward of the HF architecture (the only way
to prove the name mapping, transposes, rope scaling, q/k norm and biases), tensor by
tensor against the stored arrays, and through the paged engine against the dense forward.
"""

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from pagedjax import LLM, SamplingParams
from pagedjax.weights import checkpoint, hf
from pagedjax.runner.model import dense_forward, greedy_generate_dense
from pagedjax.weights.tokenizer import ByteTokenizer

SENTENCES = [
  "The quick brown fox jumps over the lazy dog.",
  "Paged attention stores the KV cache in fixed-size blocks.",
  "def add(a, b):\n    return a + b\n",
  "Hello, world! Hello again, world.",
]
BASE = {  # shared by every case; a case adds its own keys
  "vocab_size": 320,
  "hidden_size": 32,
  "intermediate_size": 48,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "max_position_embeddings": 64,
  "rms_norm_eps": 1e-6,
  "bos_token_id": 0,
  "eos_token_id": 1,
}
LLAMA3 = {  # theta 100 and a 32-token original context: every frequency band is hit early
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 32,
}
CASES = {
  # older config style (top-level rope_theta / rope_scaling / torch_dtype), untied, float32;
  # BOS from the tokenizer's post-processor, several EOS ids from generation_config.json.
  "llama": {
    "config": {
      "architectures": ["LlamaForCausalLM"], "rope_theta": 100.0, "rope_scaling": LLAMA3,
      "torch_dtype": "float32", "tie_word_embeddings": False, "attention_bias": False,
    },
    "dtype": np.float32, "shards": 1, "bos": "post_processor",
    "generation": {"eos_token_id": [1, 5]},
  },
  # explicit head_dim != hidden / heads, tied, sharded into 3 files with an index.
  "mistral": {
    "config": {
      "architectures": ["MistralForCausalLM"], "head_dim": 16, "sliding_window": None,
      "rope_theta": 1000.0, "tie_word_embeddings": True,
    },
    "dtype": np.float32, "shards": 3, "bos": "add_bos_token", "generation": None,
  },
  # newer config style (rope_parameters / dtype), q/k/v biases, tied, bfloat16, no BOS;
  # an inactive sliding window, and a tied lm_head copy stored anyway.
  "qwen2": {
    "config": {
      "architectures": ["Qwen2ForCausalLM"], "dtype": "bfloat16", "tie_word_embeddings": True,
      "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
      "sliding_window": 8, "use_sliding_window": False,
    },
    "dtype": ml_dtypes.bfloat16, "shards": 1, "bos": None, "generation": None,
  },
  # per-head q/k RMSNorm, explicit head_dim, untied, float16.
  "qwen3": {
    "config": {
      "architectures": ["Qwen3ForCausalLM"], "head_dim": 16, "rope_theta": 300.0,
      "torch_dtype": "float16", "tie_word_embeddings": False,
    },
    "dtype": np.float16, "shards": 1, "bos": None, "generation": {"eos_token_id": 1},
  },
}  # fmt: skip


def build_tokenizer(with_bos_post_processor: bool) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )  # fmt: skip
  tok.train_from_iterator(SENTENCES, trainer)
  if with_bos_post_processor:
    tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
  return tok


def hf_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  """Every tensor of an HF checkpoint with config `c`, written from HF's modules."""
  dim, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  d = c.get("head_dim") or dim // c["num_attention_heads"]
  q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
  arch = c["architectures"][0]
  out = {"model.embed_tokens.weight": (v, dim), "model.norm.weight": (dim,)}
  if not c["tie_word_embeddings"] or arch == "Qwen2ForCausalLM":  # qwen2: a stored tied copy
    out["lm_head.weight"] = (v, dim)
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out |= {
      p + "self_attn.q_proj.weight": (q, dim), p + "self_attn.k_proj.weight": (kv, dim),
      p + "self_attn.v_proj.weight": (kv, dim), p + "self_attn.o_proj.weight": (dim, q),
      p + "mlp.gate_proj.weight": (f, dim), p + "mlp.up_proj.weight": (f, dim),
      p + "mlp.down_proj.weight": (dim, f), p + "input_layernorm.weight": (dim,),
      p + "post_attention_layernorm.weight": (dim,),
    }  # fmt: skip
    if arch == "Qwen2ForCausalLM":
      out |= {p + f"self_attn.{n}_proj.bias": (s,) for n, s in (("q", q), ("k", kv), ("v", kv))}
    if arch == "Qwen3ForCausalLM":
      out |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
  return out


def write_checkpoint(directory, case: str, tok: tokenizers.Tokenizer) -> dict[str, np.ndarray]:
  """Writes case `case` into `directory`; returns its tensors as stored (HF layout)."""
  spec = CASES[case]
  c = {**BASE, **spec["config"]}
  rng = np.random.default_rng(list(CASES).index(case))
  tensors = {}
  for name, shape in hf_shapes(c).items():
    is_norm = name.endswith("norm.weight")
    w = (1.0 if is_norm else 0.0) + rng.normal(0, 0.1 if is_norm else 0.3, shape)
    tensors[name] = w.astype(np.float32).astype(spec["dtype"])
  if c["tie_word_embeddings"] and "lm_head.weight" in tensors:
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  os.makedirs(directory, exist_ok=True)
  names = sorted(tensors)
  if spec["shards"] == 1:
    safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"))
  else:
    n, weight_map = spec["shards"], {}
    for s, chunk in enumerate(np.array_split(np.array(names), n)):
      file = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
      safetensors.numpy.save_file({k: tensors[k] for k in chunk}, os.path.join(directory, file))
      weight_map |= {k: file for k in chunk}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
      json.dump({"metadata": {}, "weight_map": weight_map}, fh)
  tok_config = {"eos_token": "</s>", "bos_token": None}
  if spec["bos"] == "post_processor":
    tok_config["bos_token"] = "<s>"
  elif spec["bos"] == "add_bos_token":
    tok_config |= {"bos_token": {"content": "<s>", "special": True}, "add_bos_token": True}
  docs = {"config.json": c, "tokenizer_config.json": tok_config}
  if spec["generation"] is not None:
    docs["generation_config.json"] = spec["generation"]
  for file, doc in docs.items():
    with open(os.path.join(directory, file), "w") as fh:
      json.dump(doc, fh)
  tok.save(os.path.join(directory, "tokenizer.json"))
  return tensors


def reference_logits(t: dict[str, np.ndarray], c: dict, ids: list[int], rope_scaling=True):
  """HF Llama / Mistral / Qwen2 / Qwen3 forward in float64 numpy: [T, V] logits."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  eps, heads, kv_heads = c["rms_norm_eps"], c["num_attention_heads"], c["num_key_value_heads"]
  d = c.get("head_dim") or c["hidden_size"] // heads
  rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
  theta = rope.get("rope_theta", c.get("rope_theta"))

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

  inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
  if rope.get("rope_type") == "llama3" and rope_scaling:  # transformers' _compute_llama3_parameters
    old, lo, hi = (
      rope["original_max_position_embeddings"],
      rope["low_freq_factor"],
      rope["high_freq_factor"],
    )
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old / lo, inv_freq / rope["factor"], inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / rope["factor"] + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv_freq = np.where(medium, smoothed, scaled)
  n = len(ids)
  angles = np.arange(n)[:, None] * inv_freq
  cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

  def rotate(x):  # x [T, heads, D]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos[:, None] + np.concatenate([-x2, x1], -1) * sin[:, None]

  x = t["model.embed_tokens.weight"][ids]
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = rms(x, t[p + "input_layernorm.weight"])
    qkv = []
    for name, nh in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
      y = h @ t[p + f"self_attn.{name}_proj.weight"].T + t.get(p + f"self_attn.{name}_proj.bias", 0)
      qkv.append(y.reshape(n, nh, d))
    q, k, v = qkv
    if p + "self_attn.q_norm.weight" in t:
      q, k = rms(q, t[p + "self_attn.q_norm.weight"]), rms(k, t[p + "self_attn.k_norm.weight"])
    q, k = rotate(q), rotate(k)
    k, v = np.repeat(k, heads // kv_heads, 1), np.repeat(v, heads // kv_heads, 1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("hts,shd->thd", pr / pr.sum(-1, keepdims=True), v).reshape(n, heads * d)
    x = x + o @ t[p + "self_attn.o_proj.weight"].T
    h = rms(x, t[p + "post_attention_layernorm.weight"])
    gate = h @ t[p + "mlp.gate_proj.weight"].T
    up = h @ t[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
  head = "model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"
  return rms(x, t["model.norm.weight"]) @ t[head].T


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{case: (directory, stored tensors)}, written once for the module."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for case, spec in CASES.items():
    tok = build_tokenizer(with_bos_post_processor=spec["bos"] == "post_processor")
    out[case] = (str(root / case), write_checkpoint(root / case, case, tok))
  return out


@pytest.mark.parametrize("case", list(CASES))
def test_loaded_model_matches_numpy_reference_and_stored_tensors(checkpoints, case):
  directory, tensors = checkpoints[case]
  c = {**BASE, **CASES[case]["config"]}
  cfg, module, tok = checkpoint.load(directory)
  assert (cfg.max_seq_len, cfg.vocab_size, cfg.tie_embeddings) == (
    64,
    320,
    c["tie_word_embeddings"],
  )
  params = checkpoint.flat_params(module)
  f32 = {k: v.astype(np.float32) for k, v in tensors.items()}
  assert np.array_equal(params["embed.embedding"], f32["model.embed_tokens.weight"])
  assert np.array_equal(params["final_norm.scale"], f32["model.norm.weight"])
  if not c["tie_word_embeddings"]:
    assert np.array_equal(params["lm_head.kernel"], f32["lm_head.weight"].T)
  for i in range(cfg.num_layers):
    for hf_name, stored in f32.items():
      prefix = f"model.layers.{i}."
      if not hf_name.startswith(prefix):
        continue
      ours = hf_name[len(prefix) :].replace("self_attn.", "attn.")
      ours = ours.replace("input_layernorm", "attn_norm").replace(
        "post_attention_layernorm", "mlp_norm"
      )
      ours = ours.replace("_norm.weight", "_norm.scale").replace("proj.weight", "proj.kernel")
      want = stored.T if ours.endswith("kernel") else stored
      assert np.array_equal(params[f"layers.{i}.{ours}"], want), hf_name
  assert len(params) == len(tensors) - (c["tie_word_embeddings"] and "lm_head.weight" in tensors)

  ids = tok.encode("The quick dog jumps.")
  got = np.asarray(dense_forward(*nnx.split(module), np.asarray([ids])))[0]  # [T, V]
  want = reference_logits(tensors, c, ids)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  if case == "llama":  # the test can tell rope scaling apart from none
    assert not np.allclose(got, reference_logits(tensors, c, ids, rope_scaling=False), atol=1e-3)


# Each case compiles an engine (~10 s on CPU): llama by default, every case with the knob.
_LONG = os.environ.get("PAGEDJAX_LONG_TESTS") == "1"


@pytest.mark.parametrize("case", list(CASES) if _LONG else ["llama"])
def test_paged_engine_greedy_equals_dense_greedy(checkpoints, case):
  directory, _ = checkpoints[case]
  llm = LLM(model=directory, num_blocks=32, block_size=4, max_num_seqs=2, attention_impl="xla")
  prompts = ["Hello, world!", "Paged attention stores"]
  outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
  _, module, tok = checkpoint.load(directory)
  for prompt, out in zip(prompts, outs):
    want = greedy_generate_dense(module, tok.encode(prompt), 6, num_valid_tokens=tok.vocab_size)
    assert out.prompt_token_ids == tok.encode(prompt)
    assert out.outputs[0].token_ids == want, prompt
    assert out.outputs[0].text == tok.decode(want)


def test_tokenizer_round_trip_bos_and_eos(checkpoints):
  text = "Hello, paged world: ünïcödé ✓\n  def f(): pass"
  toks = {case: checkpoint.load(checkpoints[case][0])[2] for case in CASES}
  for tok in toks.values():
    assert isinstance(tok, hf.HFTokenizer) and tok.vocab_size == 300 and tok.has_text
    ids = tok.encode(text)
    assert tok.decode(ids) == text and all(0 <= i < 300 for i in ids)
    assert tok.encode(text, add_bos=False) == [i for i in ids if i != 0]
  assert toks["llama"].encode("a")[0] == 0 and toks["mistral"].encode("a")[0] == 0  # BOS
  assert toks["qwen2"].encode("a")[0] != 0 and toks["qwen2"].bos_id is None
  assert toks["llama"].eos_token_ids == (1, 5)  # generation_config.json list
  assert toks["qwen3"].eos_token_ids == (1,)  # generation_config.json int
  assert toks["mistral"].eos_token_ids == (1,)  # config.json
  # The engine's streamed text (incremental detokenization) agrees with the full decode
  # on the text above and on random token streams.
  from test_tokenizer import check_incremental
  rng = np.random.default_rng(0)
  tok = toks["llama"]
  check_incremental(tok.decode, tok.encode(text))
  for _ in range(30):
    check_incremental(tok.decode, [int(i) for i in rng.integers(0, 300, rng.integers(1, 30))])


def _broken(checkpoints, tmp_path, case="llama", config=None, drop=(), tensors=None):
  """A copy of `case` with config keys replaced, files dropped, tensors overwritten."""
  directory = str(tmp_path / case)
  shutil.copytree(checkpoints[case][0], directory)
  if config is not None:
    with open(os.path.join(directory, "config.json")) as fh:
      doc = json.load(fh)
    with open(os.path.join(directory, "config.json"), "w") as fh:
      json.dump({k: v for k, v in {**doc, **config}.items() if v != "DELETE"}, fh)
  for file in drop:
    os.remove(os.path.join(directory, file))
  if tensors is not None:
    stored = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
    stored = {k: v for k, v in {**stored, **tensors}.items() if v is not None}
    safetensors.numpy.save_file(stored, os.path.join(directory, "model.safetensors"))
  return directory


def test_sliding_window_shorter_than_context_is_refused_unless_context_fits(checkpoints, tmp_path):
  directory = _broken(checkpoints, tmp_path, "mistral", config={"sliding_window": 16})
  with pytest.raises(ValueError, match="sliding_window=16 < max_seq_len=64"):
    checkpoint.load(directory)
  assert checkpoint.load(directory, max_seq_len=16)[0].max_seq_len == 16
  with pytest.raises(ValueError, match="max_position_embeddings=64"):
    checkpoint.load(directory, max_seq_len=65)


Q0 = "model.layers.0.self_attn.q_proj.weight"
BAD_CASES = {  # name: (_broken kwargs, message)
  "missing weights": ({"drop": ["model.safetensors"]}, "no model.safetensors or model.saf"),
  "missing shard": (
    {"case": "mistral", "drop": ["model-00002-of-00003.safetensors"]}, "00002-of-00003.* not found"
  ),
  "architecture": ({"config": {"architectures": ["GPT2LMHeadModel"]}}, "GPT2LMHeadModel"),
  "rope type": ({"config": {"rope_scaling": {"rope_type": "yarn"}}}, "rope_type 'yarn'"),
  "rope key": ({"config": {"rope_scaling": {"type": "llama3"}}}, r"missing \['factor'"),
  "attention bias": ({"config": {"attention_bias": True}}, "attention_bias=True"),
  "activation": ({"config": {"hidden_act": "gelu"}}, "hidden_act='gelu'"),
  "config key": ({"config": {"num_hidden_layers": "DELETE"}}, "'num_hidden_layers'"),
  "missing tensor": ({"tensors": {Q0: None}}, f"tensor '{Q0}' not found"),
  "shape": ({"tensors": {Q0: np.zeros((32, 31), np.float32)}}, r"\(32, 31\), expected \(32, 32\)"),
  "dtype": ({"tensors": {Q0: np.zeros((32, 32), np.int8)}}, f"'{Q0}' has dtype I8"),
  "unexpected tensor": (
    {"tensors": {"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}},
    "unexpected tensors.*o_proj.bias",
  ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_checkpoint_raises_value_error_naming_the_culprit(checkpoints, tmp_path, name):
  kwargs, message = BAD_CASES[name]
  with pytest.raises(ValueError, match=message):
    checkpoint.load(_broken(checkpoints, tmp_path, **kwargs))


# ------------------------------------------------------------------ files the loader opens
def _symlink(target, link):
  try:
    os.symlink(target, link)
  except (OSError, NotImplementedError) as e:  # e.g. a filesystem without symlinks
    pytest.skip(f"this filesystem refuses symlinks: {e}")


def _rewrite_index(directory, fn):
  path = os.path.join(directory, "model.safetensors.index.json")
  with open(path) as fh:
    index = json.load(fh)
  index["weight_map"] = {k: fn(v) for k, v in index["weight_map"].items()}
  with open(path, "w") as fh:
    json.dump(index, fh)


SHARD2 = "model-00002-of-00003.safetensors"
# name: (set up `outside` (a directory next to the checkpoint holding x.safetensors, a
# valid copy of shard 2) inside `directory`, the weight_map entry that replaces shard 2)
ESCAPES = {
  "dot-dot": (None, "../outside/x.safetensors"),
  "absolute": (None, "ABSOLUTE"),
  "subdirectory escape": ("mkdir sub", "sub/../../outside/x.safetensors"),
  "symlinked file": ("link link.safetensors -> outside/x.safetensors", "link.safetensors"),
  "symlinked directory": ("link linkdir -> outside", "linkdir/x.safetensors"),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_index_entry_resolving_outside_the_checkpoint_is_refused(checkpoints, tmp_path, name):
  setup, entry = ESCAPES[name]
  directory = _broken(checkpoints, tmp_path, "mistral")
  outside = tmp_path / "outside"
  outside.mkdir()
  shutil.move(os.path.join(directory, SHARD2), outside / "x.safetensors")
  if entry == "ABSOLUTE":
    entry = str(outside / "x.safetensors")
  if setup == "mkdir sub":
    os.mkdir(os.path.join(directory, "sub"))
  elif setup is not None:
    link, target = setup.removeprefix("link ").split(" -> ")
    _symlink(tmp_path / target, os.path.join(directory, link))
  _rewrite_index(directory, lambda v: entry if v == SHARD2 else v)
  message = rf"weight_map entry .*{re.escape(repr(entry))}.*(outside|absolute)"
  with pytest.raises(ValueError, match=message):
    checkpoint.load(directory)


def test_index_entries_in_subdirectories_and_inner_symlinks_are_accepted(checkpoints, tmp_path):
  directory = _broken(checkpoints, tmp_path, "mistral")
  os.mkdir(os.path.join(directory, "sub"))
  shutil.move(os.path.join(directory, SHARD2), os.path.join(directory, "sub", "x.safetensors"))
  _symlink("sub", os.path.join(directory, "alias"))  # a directory symlink that stays inside
  _rewrite_index(directory, lambda v: "alias/../sub/x.safetensors" if v == SHARD2 else v)
  want = checkpoint.flat_params(checkpoint.load(checkpoints["mistral"][0])[1])
  got = checkpoint.flat_params(checkpoint.load(directory)[1])
  assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
  "file",
  ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
   "generation_config.json"],
)  # fmt: skip
def test_any_file_symlinked_out_of_the_checkpoint_is_refused(checkpoints, tmp_path, file):
  directory = _broken(checkpoints, tmp_path, "llama")
  outside = tmp_path / "outside"
  outside.mkdir()
  shutil.move(os.path.join(directory, file), outside / file)
  _symlink(outside / file, os.path.join(directory, file))
  with pytest.raises(ValueError, match=rf"llama/{re.escape(file)} resolves to .*outside"):
    checkpoint.load(directory)


def test_hub_cache_snapshot_symlinks_into_its_blobs_are_accepted(checkpoints, tmp_path):
  """The Hugging Face cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
  repo = tmp_path / "models--org--tiny"
  (repo / "blobs").mkdir(parents=True)
  snapshot = repo / "snapshots" / "0123abc"
  snapshot.mkdir(parents=True)
  for i, file in enumerate(sorted(os.listdir(checkpoints["llama"][0]))):
    shutil.copy(os.path.join(checkpoints["llama"][0], file), repo / "blobs" / f"blob{i}")
    _symlink(f"../../blobs/blob{i}", snapshot / file)
  cfg, _, tok = checkpoint.load(snapshot)
  assert cfg.vocab_size == 320 and tok.has_text and tok.eos_token_ids == (1, 5)
  (tmp_path / "elsewhere.json").write_text("{}")  # outside the repo's blobs: still refused
  os.remove(snapshot / "tokenizer_config.json")
  os.symlink(tmp_path / "elsewhere.json", snapshot / "tokenizer_config.json")
  with pytest.raises(ValueError, match="tokenizer_config.json resolves to .*outside"):
    checkpoint.load(snapshot)


LOOPS = {  # name: (file made a loop, message)
  "config.json to itself": ("config.json", None),
  "tokenizer.json to itself": ("tokenizer.json", None),
  "model.safetensors cycle": ("model.safetensors", "cycle"),
  "shard to itself": (SHARD2, None),
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_symlink_loop_is_a_value_error_naming_the_file(checkpoints, tmp_path, name):
  file, kind = LOOPS[name]
  directory = _broken(checkpoints, tmp_path, "mistral" if file == SHARD2 else "llama")
  path = os.path.join(directory, file)
  os.remove(path)
  if kind == "cycle":
    _symlink(os.path.join(directory, "other"), path)
    _symlink(path, os.path.join(directory, "other"))
  else:
    _symlink(path, path)
  with pytest.raises(ValueError, match=rf"{re.escape(path)}: symlink loop"):
    checkpoint.load(directory)


# ------------------------------------------------------------------ config values
def _bad_value_message(key, value):
  return rf"config\.json: {re.escape(key)} .*{re.escape(repr(value))}"


BAD_VALUES = {  # (config.json key, bad value) for the llama case
  "hidden_size": "32",
  "num_attention_heads": 0,
  "num_hidden_layers": -1,
  "vocab_size": 3.5,
  "intermediate_size": 0,
  "num_key_value_heads": "2",
  "max_position_embeddings": True,
  "head_dim": -8,
  "rms_norm_eps": "x",
  "rope_theta": 0,
  "tie_word_embeddings": "yes",
  "attention_bias": "false",
  "mlp_bias": 1,
  "bos_token_id": "0",
  "eos_token_id": 320,
}


@pytest.mark.parametrize(("key", "value"), BAD_VALUES.items(), ids=list(BAD_VALUES))
def test_config_value_of_wrong_type_or_range_names_file_key_and_value(
  checkpoints, tmp_path, key, value
):
  with pytest.raises(ValueError, match=_bad_value_message(key, value)):
    checkpoint.load(_broken(checkpoints, tmp_path, config={key: value}))


BAD_CONFIGS = {  # name: (case, config.json changes, message)
  "negative eps": ("llama", {"rms_norm_eps": -1e-6}, _bad_value_message("rms_norm_eps", -1e-6)),
  "nan theta": ("qwen3", {"rope_theta": float("nan")}, _bad_value_message("rope_theta", float("nan"))),
  "inf eps": ("llama", {"rms_norm_eps": float("inf")}, _bad_value_message("rms_norm_eps", float("inf"))),
  "kv heads do not divide": (
    "llama", {"num_key_value_heads": 3}, r"config\.json: num_attention_heads=4 .*num_key_value_heads=3"
  ),
  "odd head_dim": ("qwen3", {"head_dim": 15}, r"config\.json: head_dim=15 must be even"),
  "rope_parameters not a dict": (
    "qwen2", {"rope_parameters": "x"}, _bad_value_message("rope_parameters", "x")
  ),
  "rope theta in rope_parameters": (
    "qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
    _bad_value_message("rope_parameters.rope_theta", -1.0),
  ),
  "llama3 factor": (
    "llama", {"rope_scaling": {**LLAMA3, "factor": "8"}}, _bad_value_message("rope_scaling.factor", "8")
  ),
  "llama3 original context": (
    "llama", {"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 32.5}},
    _bad_value_message("rope_scaling.original_max_position_embeddings", 32.5),
  ),
  "llama3 frequency order": (
    "llama", {"rope_scaling": {**LLAMA3, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
    r"config\.json: rope_scaling\.high_freq_factor .*low_freq_factor",
  ),
  "sliding window": ("mistral", {"sliding_window": "16"}, _bad_value_message("sliding_window", "16")),
  "use_sliding_window": (
    "qwen2", {"use_sliding_window": "no"}, _bad_value_message("use_sliding_window", "no")
  ),
  "architectures not a list": ("llama", {"architectures": 7}, r"config\.json: architectures 7"),
  "eos id list": ("mistral", {"eos_token_id": [1, "2"]}, _bad_value_message("eos_token_id", "2")),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_values_name_file_and_key(checkpoints, tmp_path, name):
  case, config, message = BAD_CONFIGS[name]
  with pytest.raises(ValueError, match=message):
    checkpoint.load(_broken(checkpoints, tmp_path, case, config=config))


@pytest.mark.parametrize(
  ("file", "doc", "message"),
  [
    ("generation_config.json", {"eos_token_id": -1}, "generation_config.json: eos_token_id .*-1"),
    ("generation_config.json", [1], "generation_config.json: expected a JSON object"),
    ("tokenizer_config.json", {"add_bos_token": "yes"}, "tokenizer_config.json: add_bos_token .*'yes'"),
    ("tokenizer_config.json", {"bos_token": 3}, "tokenizer_config.json: bos_token .*3"),
  ],
)  # fmt: skip
def test_bad_tokenizer_side_json_names_file_and_key(checkpoints, tmp_path, file, doc, message):
  directory = _broken(checkpoints, tmp_path)
  with open(os.path.join(directory, file), "w") as fh:
    json.dump(doc, fh)
  with pytest.raises(ValueError, match=message):
    checkpoint.load(directory)


@pytest.mark.parametrize(
  "content", [b"\x80\x81\xfe\xff\x00binary", b'{"vocab_size": ', b'"a string"', b"null"]
)
@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json"])
def test_unreadable_or_non_object_json_names_the_file(checkpoints, tmp_path, file, content):
  directory = _broken(checkpoints, tmp_path, "mistral")
  with open(os.path.join(directory, file), "wb") as fh:
    fh.write(content)
  with pytest.raises(ValueError, match=rf"mistral/{re.escape(file)}: (cannot read|expected a JSON object)"):
    checkpoint.load(directory)


# ------------------------------------------------------------------ weight values
K1 = "model.layers.1.self_attn.k_proj.weight"


def _with_bad_value(array, value, at):
  array = array.copy()
  array[at] = value
  return array


@pytest.mark.parametrize(
  ("case", "tensor", "value"),
  [("llama", Q0, np.nan), ("llama", "model.embed_tokens.weight", np.inf),
   ("qwen2", "model.norm.weight", -np.inf), ("qwen3", "lm_head.weight", np.nan)],
)  # fmt: skip
def test_non_finite_weight_is_refused_naming_the_tensor(checkpoints, tmp_path, case, tensor, value):
  stored = checkpoints[case][1][tensor]
  bad = _with_bad_value(stored, value, (0,) * (stored.ndim - 1) + (3,))
  directory = _broken(checkpoints, tmp_path, case, tensors={tensor: bad})
  where = f"index {(0,) * (stored.ndim - 1) + (3,)}"
  with pytest.raises(ValueError, match=rf"'{re.escape(tensor)}' has 1 non-finite .*{value}.*{re.escape(where)}"):
    checkpoint.load(directory)


def test_non_finite_weight_in_a_shard_is_refused_naming_shard_and_tensor(checkpoints, tmp_path):
  directory = _broken(checkpoints, tmp_path, "mistral")
  path = os.path.join(directory, SHARD2)
  shard = safetensors.numpy.load_file(path)
  name = sorted(shard)[0]
  shard[name] = _with_bad_value(shard[name], np.nan, (0,) * shard[name].ndim)
  safetensors.numpy.save_file(shard, path)
  with pytest.raises(ValueError, match=rf"{re.escape(SHARD2)}: tensor '{re.escape(name)}' has 1 non-finite"):
    checkpoint.load(directory)


# ------------------------------------------------------------------ without a tokenizer
def _check_token_id_tokenizer(tok, message):
  assert not tok.has_text and tok.vocab_size == 320 and tok.eos_token_ids == (1, 5)
  with pytest.raises(ValueError, match=message):
    tok.encode("Hello")
  assert tok.decode([3, 4, 5]) == "" and tok.decode([]) == ""


def test_checkpoint_without_tokenizer_json_loads_for_token_id_prompts(checkpoints, tmp_path):
  directory = _broken(checkpoints, tmp_path, drop=["tokenizer.json", "tokenizer_config.json"])
  cfg, module, tok = checkpoint.load(directory)
  _check_token_id_tokenizer(tok, r"no tokenizer\.json.*only token-id prompts")
  want = checkpoint.flat_params(checkpoint.load(checkpoints["llama"][0])[1])
  assert all(np.array_equal(v, want[k]) for k, v in checkpoint.flat_params(module).items())
  with pytest.raises(ValueError, match="tokenizer.json not found"):  # asked for directly
    hf.HFTokenizer.from_dir(directory, cfg)


def test_skip_tokenizer_init_never_reads_the_tokenizer(checkpoints, tmp_path):
  directory = _broken(checkpoints, tmp_path)
  with open(os.path.join(directory, "tokenizer.json"), "wb") as fh:
    fh.write(b"\x00 not a tokenizer")
  with pytest.raises(ValueError, match="cannot load tokenizer"):
    checkpoint.load(directory)
  _, _, tok = checkpoint.load(directory, skip_tokenizer_init=True)
  _check_token_id_tokenizer(tok, r"skip_tokenizer_init=True.*only token-id prompts")


def test_every_tokenizer_says_whether_it_has_text(checkpoints):
  assert ByteTokenizer.has_text and ByteTokenizer().has_text
  assert checkpoint.load(checkpoints["qwen3"][0])[2].has_text
  assert hf.HFTokenizer.has_text and not hf.TokenIdTokenizer.has_text

"""bench/kv_quantization.py in its --quick form: the report's fields and the relations its
figures must satisfy (no timing asserted). Its own file so that xdist can run it beside
the other benchmark tests."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("matplotlib")

# Long (the suite stays under 10 minutes on a 2-core machine): PAGEDJAX_LONG_TESTS=1.
pytestmark = pytest.mark.skipif(
    os.environ.get("PAGEDJAX_LONG_TESTS") != "1",
    reason="the quick bench.kv_quantization run (~1 min; quantized pools themselves: "
           "tests/test_kv_quantization.py): PAGEDJAX_LONG_TESTS=1")

from bench import kv_quantization  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  return out, kv_quantization.run(quick=True, out_dir=out)


def test_report_written_with_figure(report):
  out, rep = report
  assert json.loads((out / "kv_quantization.json").read_text()) == json.loads(json.dumps(rep))
  assert (out / "kv_quantization.png").stat().st_size > 1000


def test_accuracy_sections(report):
  _, rep = report
  assert rep["xla_path_vs_dequantized_max_abs_err"] < 1e-5
  err = {(r["kv"], r["kv_cache_dtype"], r["scales"]): r for r in rep["attention_error"]}
  for kv in ("unit-normal", "bundled model"):
    # more bits, less error: bf16 (8 mantissa bits) < int8 (per-token) < fp8 (3 bits)
    assert (err[(kv, "bfloat16", "-")]["mean_abs_err"] < err[(kv, "int8", "token")]["mean_abs_err"]
            < err[(kv, "fp8", "token")]["mean_abs_err"])
    for d in ("int8", "fp8"):
      assert 0 < err[(kv, d, "token")]["mean_rel_err"] < 0.1
  bpb = {(r["kv_cache_dtype"], r["scales"]): r["bits_per_byte"] for r in rep["bits_per_byte"]}
  assert set(bpb) == {("auto", "-"), ("int8", "token"), ("int8", "block")}
  assert all(0.3 < v < 3 for v in bpb.values())
  assert abs(bpb[("int8", "token")] - bpb[("auto", "-")]) < 0.05
  (agree,) = rep["agreement"]
  # 2 prompts x 8 tokens: int8 drifts from float32 only at near-ties (full run: first
  # divergence at token 33 or later), so most of these tokens agree
  assert agree["kv_cache_dtype"] == "int8" and agree["identical_token_fraction"] >= 0.5
  assert len(agree["float32_top2_margin_at_divergence"]) == 2 - agree["prompts_fully_identical"]


def test_capacity_and_swap_sections(report):
  _, rep = report
  cap = {r["kv_cache_dtype"]: r for r in rep["capacity"]}
  assert cap["auto"]["bytes_per_block"] == 65536 and cap["int8"]["bytes_per_block"] == 18432
  budget = rep["inputs"]["kv_cache_memory_mb"] * 2**20
  assert cap["auto"]["num_blocks"] == budget // 65536
  assert cap["int8"]["num_blocks"] == budget // 18432 > 3 * cap["auto"]["num_blocks"]
  assert rep["headline"]["int8 blocks per MiB vs float32"] == round(65536 / 18432, 3)
  for r in rep["swap"]:
    assert r["num_preemptions_swap"] > 0 and r["blocks_swapped"] > 0
    assert r["outputs_equal_async"] is True
    assert r["host_bytes_per_block"] == 18432
    assert r["swap_mib"] == pytest.approx(r["blocks_swapped"] * 18432 / 2**20)


def test_block_scales_round_a_block_with_one_scale():
  x = jax.random.normal(jax.random.key(0), (1, 40, 2, 8))
  y = kv_quantization.fake_quant(x, "int8", "block")
  assert y.shape == x.shape
  # within a block and kv head every value is a multiple of the one scale amax / 127
  blk = np.asarray(x[0, :16, 0])
  step = np.abs(blk).max() / 127
  np.testing.assert_allclose(np.asarray(y[0, :16, 0]) / step,
                             np.round(np.asarray(y[0, :16, 0]) / step), atol=1e-3)
  np.testing.assert_array_equal(np.asarray(kv_quantization.fake_quant(x, "auto")), np.asarray(x))
  tok = kv_quantization.fake_quant(x, "int8", "token")
  assert float(jnp.abs(tok - x).mean()) < float(jnp.abs(y - x).mean())

"""bench/tensor_parallel.py in its --quick form (a subprocess with 8 CPU devices): the
report's fields and the relations its figures must satisfy (no timing asserted)."""

import json
import os

import pytest

pytest.importorskip("matplotlib")

# Long (the suite stays under 10 minutes on a 2-core machine): PAGEDJAX_LONG_TESTS=1.
pytestmark = pytest.mark.skipif(
    os.environ.get("PAGEDJAX_LONG_TESTS") != "1",
    reason="the quick bench.tensor_parallel run (~1 min; tensor parallelism itself: "
           "tests/test_tensor_parallel.py): PAGEDJAX_LONG_TESTS=1")

from bench import tensor_parallel  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  return out, tensor_parallel.run(quick=True, out_dir=out)


def test_report_written_with_figure(report):
  out, rep = report
  assert json.loads((out / "tensor_parallel.json").read_text()) == json.loads(json.dumps(rep))
  assert (out / "tensor_parallel.png").stat().st_size > 1000


def test_memory_per_device_shrinks_with_k_until_kv_heads_replicate(report):
  _, rep = report
  rows = {r["tensor_parallel_size"]: r for r in rep["memory"]}
  assert sorted(rows) == [1, 2, 4, 8]
  hkv = rep["inputs"]["num_kv_heads"]
  budget = rep["inputs"]["kv_cache_memory_mb_per_device"] * 2**20
  for k, r in rows.items():
    assert r["kv_heads_per_device"] == max(hkv, k) // k
    assert r["bytes_per_block_per_device"] == rows[1]["bytes_per_block_per_device"] * \
        r["kv_heads_per_device"] // hkv
    assert r["num_blocks"] == budget // r["bytes_per_block_per_device"]
    assert r["kv_tokens_in_budget"] == r["num_blocks"] * rep["inputs"]["block_size"]
    assert r["outputs_equal_k1"] is True
  assert rows[2]["num_blocks"] == 2 * rows[1]["num_blocks"]
  assert rows[8]["num_blocks"] == rows[4]["num_blocks"]  # 4 kv heads: k = 8 replicates


def test_communication_is_two_all_reduces_per_layer_of_the_residual(report):
  _, rep = report
  comm = rep["communication"]
  assert {r["tensor_parallel_size"] for r in comm} == {2, 4, 8}
  for r in comm:
    assert r["other_collectives"] == []
    assert r["all_reduce_count"] == 2 * rep["inputs"]["num_layers"]
    assert r["all_reduce_bytes"] == r["megatron_bytes"]

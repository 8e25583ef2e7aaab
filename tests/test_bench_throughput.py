"""The throughput benchmark's pieces: seeded workloads, the contiguous baseline, the report.

The baseline's greedy tokens must equal the engine's (its correctness anchor), the
workload must be reproducible and fit the context, and `--quick` must write a JSON with
sane fields and a figure. No timing is asserted: figures depend on the machine and its load.
"""

import json

import numpy as np
import pytest

from bench import common, run_all, throughput
from bench.contiguous_baseline import ContiguousServer
from bench.workloads import make_trace
from pagedjax import LLM, SamplingParams
from pagedjax.weights import checkpoint


@pytest.mark.parametrize("name", ["sharegpt-like", "alpaca-like"])
def test_trace_is_seeded_and_fits_the_context(name):
  a = make_trace(name, 300, max_seq_len=512, seed=3)
  assert a == make_trace(name, 300, max_seq_len=512, seed=3)
  assert a.prompts != make_trace(name, 300, max_seq_len=512, seed=4).prompts
  assert all(len(p) >= 1 and o >= 1 and len(p) + o <= 512 for p, o in zip(a.prompts, a.output_lens))
  d = a.describe()
  assert d["scale"] == 0.25 and "0.25" in d["scale_note"]
  # Scaled means land near paper mean x scale (clipping and sampling noise aside).
  assert 0.6 < d["mean_input"] / (d["paper_mean_input"] * 0.25) < 1.4
  assert 0.6 < d["mean_output"] / (d["paper_mean_output"] * 0.25) < 1.4


def test_bad_trace_arguments_raise():
  with pytest.raises(ValueError, match="unknown mix"):
    make_trace("nope", 3, max_seq_len=512)
  with pytest.raises(ValueError, match="num_requests"):
    make_trace("alpaca-like", 0, max_seq_len=512)


@pytest.mark.parametrize("reserve", ["max-context", "oracle"])
def test_baseline_greedy_tokens_equal_the_engine(reserve):
  _, module, tok = checkpoint.load(None)
  prompts = [tok.encode("The Python "), tok.encode("def f(x):\n    return "), tok.encode("A")]
  outs = [9, 5, 12]
  srv = ContiguousServer(
    module, budget_tokens=1024, reserve=reserve, num_valid_tokens=tok.vocab_size
  )
  got = srv.generate(prompts, outs)
  llm = LLM(num_blocks=64, max_num_seqs=4, attention_impl="xla")
  want = llm.generate(
    prompts, [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outs]
  )
  assert got == [w.outputs[0].token_ids for w in want]


def test_baseline_batches_fit_the_budget():
  _, module, _ = checkpoint.load(None)
  rng = np.random.default_rng(0)
  ins, outs = rng.integers(1, 200, 40).tolist(), rng.integers(1, 300, 40).tolist()
  outs = [min(o, 512 - i) for i, o in zip(ins, outs)]
  for reserve in ("max-context", "oracle"):
    srv = ContiguousServer(module, budget_tokens=2048, reserve=reserve)
    batches = srv.plan_batches(ins, outs)
    assert sorted(j for idx, _ in batches for j in idx) == list(range(40))
    for idx, s_max in batches:
      assert len(idx) * s_max <= 2048
      assert all(ins[j] + outs[j] <= s_max for j in idx)


def test_quick_run_writes_sane_json_only_under_tmp(tmp_path, monkeypatch):
  # Through bench.run_all, as a user runs it: a quick run never touches bench/results/.
  results = tmp_path / "results"
  monkeypatch.setattr(common, "RESULTS", results)
  summary = run_all.run(quick=True, only=["throughput"])
  assert summary["experiments"]["throughput"]["status"] == "ok"
  written = sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file())
  assert written == ["tmp/summary.json", "tmp/throughput.json", "tmp/throughput.png"]
  assert (results / "tmp" / "throughput.png").stat().st_size > 1000
  doc = json.loads((results / "tmp" / "throughput.json").read_text())
  assert doc["figure"] == "throughput.png"
  assert doc["inputs"]["quick"] and doc["seed"] == 0
  assert {"platform", "jax", "load_average_start", "load_average_end"} <= doc["machine"].keys()
  assert doc["workload"]["name"] == "sharegpt-like"
  assert set(doc["systems"]) == {"engine", "contiguous/max-context", "contiguous/oracle"}
  for r in doc["systems"].values():
    assert r["requests_per_s"] > 0 and r["output_tokens_per_s"] > 0
    assert 0 < r["kv_util_of_budget"] <= r["kv_util_of_reserved"] <= 1
    assert r["num_compilations"] >= 1
  assert set(doc["ratio_engine_over"]) == {"contiguous/max-context", "contiguous/oracle"}
  assert 0 <= doc["greedy_agreement_engine_vs_contiguous"] <= 1
  steady = doc["steady_decode"]
  assert steady["model_gflops"] > 0 and steady["fraction_of_matmul_rate"] > 0
  assert steady["fraction_of_matmul_rate_at_step_shape"] > 0
  assert doc["prefill"]["tokens"] == 64 and doc["prefill"]["fraction_of_matmul_rate_at_step_shape"] > 0
  assert steady["step_split_s"]["device_step_synced"] > 0
  assert set(steady["host_share_by_batch"]) == {"4", "1"}
  # Shares of two timings (the step, the device step alone): below 1 (no sign asserted:
  # a quick run does not warm up, and overlapped host work can meet the device's time).
  for shares in (steady["host_share_by_batch"], steady["host_share_by_batch_after_results"]):
    assert set(shares) == {"4", "1"} and all(v < 1 for v in shares.values())
  for b, split in steady["host_step_split_s_by_batch"].items():  # each share's own run
    assert split["device_step_synced"] > 0 and steady["host_median_step_s_by_batch"][b] > 0
    assert steady["host_share_pairs_by_batch"][b] >= 1
  e2e = doc["end_to_end"]
  assert e2e["num_requests"] == 2 and e2e["model_gflops"] > 0 and e2e["wall_s"] > 0
  assert 0 < e2e["fraction_of_matmul_rate_64x256x704"] and e2e["num_steps"] >= e2e["mean_output"]
  # multi-step decoding (num_scheduler_steps 2 in a quick run): per decode step
  assert set(steady["multi_step"]) == {"4", "1"}
  for m in steady["multi_step"].values():
    assert m["num_scheduler_steps"] == 2 and m["num_full_decode_steps"] >= 1
    assert m["model_gflops"] > 0 and m["host_share"] < 1
  e2m = e2e["multi_step"]
  assert e2m["engine_kwargs"]["num_scheduler_steps"] == 2
  assert e2m["num_steps"] < e2e["num_steps"] and e2m["fraction_of_matmul_rate_64x256x704"] > 0
  assert e2e["after_results"]["engine_kwargs"]["async_scheduling"] is False
  assert e2e["after_results"]["output_tokens_per_s"] > 0
  assert doc["matmul_rate"]["256x256x704"]["gflops"] > 0
  assert doc["notes"]

"""Smoke tests of bench/sharing.py and bench/swap_vs_recompute.py (their --quick runs).

Each runs its `--quick` configuration into a temporary folder and checks that the report
is sane: savings are percentages and positive wherever blocks are shared, the two
preemption modes produced identical outputs after real preemptions, timings are
positive, and the JSON and PNG files exist. No timing is asserted: figures depend on
the machine and its load. Most of the run time is XLA compiling the engine's step
programs (~10 of them).
"""

import json

import pytest

from bench import sharing, swap_vs_recompute


@pytest.fixture(scope="module")
def sharing_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharing")
  return sharing.run(quick=True, out_dir=out), out


@pytest.fixture(scope="module")
def swap_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("swap")
  return swap_vs_recompute.run(quick=True, out_dir=out), out


def test_sharing_report_is_sane(sharing_report):
  doc, out = sharing_report
  assert json.loads((out / "sharing.json").read_text()) == doc
  assert (out / "sharing.png").stat().st_size > 0
  assert {p["mode"] for p in doc["points"]} == {"parallel", "beam"}
  for p in doc["points"]:
    assert p["width"] >= 2
    for key in ("saving_pct", "saving_at_peak_pct"):
      assert 0 <= p[key] <= 100, (key, p)
    # Forks share the prompt's full blocks at least right after the prefill.
    assert p["saving_pct"] > 0, p
    assert p["peak_physical_blocks"] <= p["peak_logical_blocks"]
    assert p["num_steps"] > 0
  assert doc["headline"] and doc["notes"] and doc["machine"]["load_avg_1m_5m_15m"]
  assert set(doc["paper_ranges_pct"]) == {
    f"{mode}/{mix}" for mode in sharing.MODES for mix in sharing.MIXES
  }


def test_swap_vs_recompute_report_is_sane(swap_report):
  doc, out = swap_report
  assert json.loads((out / "swap_vs_recompute.json").read_text()) == doc
  assert (out / "swap_vs_recompute.png").stat().st_size > 0
  e2e = doc["end_to_end"]
  assert e2e["outputs_identical"] is True
  rec, swp = e2e["modes"]["recompute"], e2e["modes"]["swap"]
  assert rec["num_preemptions_recompute"] > 0 and rec["num_blocks_swapped_out"] == 0
  assert swp["num_preemptions_swap"] > 0
  assert swp["num_blocks_swapped_out"] == swp["num_blocks_swapped_in"] > 0
  # Recompute prefills the preempted tokens again; swap does not.
  assert rec["num_prefill_tokens"] > swp["num_prefill_tokens"]
  for m in (rec, swp):
    assert m["wall_s_median"] > 0 and m["leaked_blocks"] == 0
    assert m["num_generated_tokens"] == rec["num_generated_tokens"]
  assert doc["micro"]
  for r in doc["micro"]:
    for key in ("swap_out_s", "swap_in_s", "recompute_s", "swap_ms_per_block"):
      assert r[key] > 0, (key, r)
    assert r["num_blocks_moved"] * r["block_size"] == doc["inputs"]["micro"]["num_tokens"]

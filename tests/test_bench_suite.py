"""The benchmark suite's own experiments run in their --quick form and report sane figures.

Covers bench/memory_waste.py, bench/fragmentation.py, bench/memory_timeline.py,
bench/host_overhead.py, bench/attention.py, bench/pool_scaling.py, bench/serving.py,
bench/prefix_caching.py, bench/serving_http.py and bench/run_all.py. Each experiment runs
once per module (fixtures), writing into a temporary folder; the tests check the JSON's
fields and the relations the figures must satisfy. No timing is asserted.
"""

import json
import string

import pytest

pytest.importorskip("matplotlib")

from bench import (attention, fragmentation, host_overhead, memory_timeline, memory_waste,
                   pool_scaling, prefix_caching, run_all, serving, serving_http)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def waste(out_dir):
  return memory_waste.run(quick=True, out_dir=out_dir)


@pytest.fixture(scope="module")
def frag(out_dir, waste):  # after `waste`: same trace and pool, the compiled programs are reused
  return fragmentation.run(quick=True, out_dir=out_dir)


@pytest.fixture(scope="module")
def timeline(out_dir):
  return memory_timeline.run(quick=True, out_dir=out_dir)


def _written(out_dir, name, report, *, png=True):
  assert json.loads((out_dir / f"{name}.json").read_text()) == json.loads(json.dumps(report))
  if png:
    assert (out_dir / f"{name}.png").stat().st_size > 1000


def test_memory_waste_paged_beats_contiguous(out_dir, waste):
  _written(out_dir, "memory_waste", waste)
  assert {r["mix"] for r in waste["results"]} == set(memory_waste.MIXES)
  for row in waste["results"]:
    pol = row["policies"]
    assert set(pol) == set(memory_waste.POLICIES)
    for figures in pol.values():
      assert 0.0 <= figures["waste_pct"] <= 100.0
      assert figures["mean_allocated_mib"] >= row["mean_used_mib"] > 0
    # Paging reserves at most one partial block per sequence; max-context reserves 512.
    assert pol["paged"]["waste_pct"] < pol["contiguous max context"]["waste_pct"]
    assert (
      pol["contiguous prompt+max_tokens"]["waste_pct"] < pol["contiguous max context"]["waste_pct"]
    )
    assert row["num_preemptions"] == 0
    assert row["steps"] >= max(1, row["trace"]["max_output"])
  assert all(isinstance(v, float) for v in waste["headline"].values())


def test_fragmentation_replay_matches_engine_and_grows_with_block_size(out_dir, frag, waste):
  _written(out_dir, "fragmentation", frag)
  rows = frag["results"]
  assert [r["block_size"] for r in rows] == list(fragmentation.BLOCK_SIZES)
  pcts = [r["fragmentation_pct"] for r in rows]
  assert all(0.0 <= p <= 100.0 for p in pcts)
  # ceil(n / 2B) * 2B >= ceil(n / B) * B for every n: doubling the block never wastes less.
  assert pcts == sorted(pcts)
  assert all(r["attention_ms"] > 0 for r in rows)
  check = frag["engine_check"]["16"]
  assert check["replay_pct"] == pytest.approx(check["engine_pct"], abs=1e-9)
  # The same seeded sharegpt-like trace as memory_waste's quick run, on the same schedule.
  sharegpt = next(r for r in waste["results"] if r["mix"] == "sharegpt-like")
  assert check["engine_pct"] == pytest.approx(sharegpt["policies"]["paged"]["waste_pct"])


def test_fragmentation_replay_counts_partial_blocks():
  # Two steps: lengths {1, 16} then {17}; at block 16: reserved 16+16+32 = 64, filled 34.
  got = fragmentation.replay_fragmentation([[1, 16], [], [17]], 16)
  assert got["fragmentation_pct"] == pytest.approx(100 * (1 - 34 / 64))
  assert got["mean_empty_slots_per_seq"] == pytest.approx((15 + 0 + 15) / 3)


def test_memory_timeline_shows_sharing_and_preemption(out_dir, timeline):
  _written(out_dir, "memory_timeline", timeline)
  assert (out_dir / "memory_timeline.json").stat().st_size < 200_000
  steps, totals = timeline["steps"], timeline["totals"]
  assert len(steps) == totals["num_steps"] == timeline["headline"]["steps"]
  owners = set(string.ascii_uppercase[: len(timeline["requests"])])
  for s in steps:
    assert len(s["device"]) == memory_timeline.NUM_BLOCKS
    assert len(s["host"]) == memory_timeline.NUM_HOST_BLOCKS
    assert set(s["device"].upper()) <= owners | {"."}
    assert s["used"] == memory_timeline.NUM_BLOCKS - s["device"].count(".")
    assert s["shared"] == sum(c.islower() for c in s["device"])
    assert s["host_used"] == memory_timeline.NUM_HOST_BLOCKS - s["host"].count(".")
  # Every request got blocks at some point; the samples and the beams shared some.
  assert set("".join(s["device"] for s in steps).upper()) - {"."} == owners
  assert max(s["shared"] for s in steps) > 0
  assert totals["num_preemptions_swap"] >= 1
  assert any(s["host_used"] for s in steps)
  assert any("swap-out" in s["events"] for s in steps)
  assert any("swap-in" in s["events"] for s in steps)
  assert steps[-1]["used"] == 0 and steps[-1]["host_used"] == 0


def test_host_overhead_quick(out_dir):
  report = host_overhead.run(quick=True, out_dir=out_dir, num_seqs=[64], steps=4, repeats=2)
  _written(out_dir, "host_overhead", report)
  assert report["figure"] == "host_overhead.png"
  ops = {r["op"] for r in report["results"]}
  assert {"append_slot", "fork", "free (forked child)"} <= ops
  assert all(r["median_us"] > 0 for r in report["results"] if "median_us" in r)
  assert len(report["headline"]) == 1


def test_attention_quick(out_dir):
  report = attention.run(quick=True, out_dir=out_dir, runs=1, contexts=[64])
  _written(out_dir, "attention", report)
  assert report["figure"] == "attention.png"
  assert [(r["context"], r["dtype"]) for r in report["results"]] == [
    (64, "float32"),
    (64, "bfloat16"),
  ]
  assert all(r["ratio_xla"] > 0 for r in report["results"])


def test_pool_scaling_quick(out_dir):
  report = pool_scaling.run(quick=True, out_dir=out_dir, pools=[64, 256], steps=3)
  _written(out_dir, "pool_scaling", report)
  rows = report["results"]
  assert [(r["batch"], r["num_blocks"]) for r in rows] == [(1, 64), (1, 256), (2, 64), (2, 256)]
  for r in rows:
    assert r["decode_steps"] == 3 and r["ms_per_step"] > 0
    assert r["ms_per_token"] == pytest.approx(r["ms_per_step"] / r["batch"])
    assert r["kv_pool_mib"] > 0 and r["fraction_of_matmul_rate"] > 0
  assert rows[0]["ratio_to_smallest_pool"] == rows[2]["ratio_to_smallest_pool"] == 1.0
  assert report["matmul_rate"]["gflops"] > 0 and len(report["headline"]) == 4


def test_serving_quick(out_dir):
  report = serving.run(quick=True, out_dir=out_dir, num_requests=3)
  _written(out_dir, "serving", report)
  t = report["traces"]["sharegpt-like"]
  assert set(t["systems"]) == {"paged", "orca-max"}
  for rows in t["systems"].values():
    assert [r["rate"] for r in rows] == sorted(r["rate"] for r in rows)
    for r in rows:
      assert r["normalized_latency_s"] > 0 and r["ttft_s_p50"] <= r["ttft_s_p99"]
      assert r["itl_s_p50"] <= r["itl_s_p99"] and r["num_preemptions"] >= 0
  assert t["threshold_s"] > 0 and set(t["chunked_prefill_at_highest_rate"]) == {"on"}
  assert t["systems"]["orca-max"][0]["num_preemptions"] == 0  # reservation never preempts


def test_prefix_caching_quick(out_dir):
  report = prefix_caching.run(quick=True, out_dir=out_dir, num_requests=3)
  _written(out_dir, "prefix_caching", report)
  rows = report["results"]
  names = {r["workload"] for r in rows}
  assert names == {"1-shot x1", "5-shot x1", "chat", "no sharing"}
  for r in rows:
    assert r["outputs_identical"] if r["prefix_caching"] else "outputs_identical" not in r
    assert 0.0 <= r["hit_rate"] <= r["shareable_hit_rate"] + 1e-9 <= 1.0 + 1e-9
    if not r["prefix_caching"]:
      assert r["prefix_cache_hits"] == 0
  get = {(r["workload"], r["prefix_caching"]): r for r in rows}
  for name in ("1-shot x1", "5-shot x1", "chat"):  # a shared prefix is computed once
    on, off = get[(name, True)], get[(name, False)]
    assert on["shareable_hit_rate"] > 0 and on["hit_rate"] > 0
    assert off["num_prefill_tokens"] - on["num_prefill_tokens"] == on["prefix_cache_hits"]
  assert get[("no sharing", True)]["num_prefill_tokens"] == get[("no sharing", False)][
    "num_prefill_tokens"] - get[("no sharing", True)]["prefix_cache_hits"]
  assert report["headline"]["all outputs identical"] is True


def test_prefix_caching_shareable_counts_full_blocks_before_the_last_prompt_token():
  bs = prefix_caching.BLOCK_SIZE
  a = list(range(2 * bs + 3))
  b = a[: 2 * bs] + [7]  # shares two full blocks with a; its last token is always computed
  c = a[: 2 * bs]  # exactly two blocks: the second holds its last token, so one block hits
  queried, hit = prefix_caching.shareable_hits([[(a, [1]), (b, [1]), (c, [1])]])
  assert queried == len(a) + len(b) + len(c)
  assert hit == 2 * bs + bs


def test_run_all_headline_and_skips():
  assert run_all.headline({"headline": {"a": 1}, "b": 2}) == {"a": 1}
  assert run_all.headline({"x": 1.5, "flag": True, "d": {"u": 2, "v": 3}, "s": "t"}) == {
    "x": 1.5,
    "d.u": 2,
    "d.v": 3,
  }
  assert run_all.run_one("no_such_experiment", quick=True)["status"].startswith("skipped")
  with pytest.raises(ValueError, match="no_such"):
    run_all.run(quick=True, only=["no_such"])


def test_serving_http_quick(out_dir):
  report = serving_http.run(quick=True, out_dir=out_dir, num_requests=3)
  _written(out_dir, "serving_http", report)
  rows = {r["system"]: r for r in report["results"]}
  assert set(rows) == {"in-process", "http"}
  for r in rows.values():
    assert r["wall_s"] > 0 and r["output_tokens_per_s"] > 0
    assert 0 < r["p50_ttft_s"] <= r["p99_ttft_s"] <= r["wall_s"]
  assert report["outputs_identical"] is True  # the server's streams equal the engine's text

"""The HTTP server's overhead: the same trace through the OpenAI-compatible server and
through the in-process engine, in one run.

Trace: sharegpt-like (bench/workloads.py), token-id prompts, greedy, ignore_eos, every
request submitted at t=0 (offline throughput, as the other traces). Both systems are the
engine at its defaults (`LLM()`, block 16); each serves the trace once to warm up
(compiled programs), then once measured:
  * "in-process": `add_request` for all, then `step()` until done (the streaming API).
  * "http": `python main.py --mode=server --precompile` in its own process (as a user
    runs it; --precompile, because requests arriving over HTTP form batches of shapes the
    warm-up may not have compiled: without it one run measured 0.26x, mostly compiles);
    this process opens one streaming /v1/completions request per trace request at once over
    the loopback (httpx, asyncio) and reads the SSE chunks. With --quick the server runs
    in a thread of this process instead (no second start-up), which also puts the
    client's work on the server's GIL: an upper bound on the overhead.
Between warm-up and measurement the prefix cache is reset (POST /reset_prefix_cache on the
server), so both measure the cold trace. Per system: wall time, output tokens/s, TTFT (submission to the first chunk carrying a
token: logprobs=0 on both sides, so every token is visible in its chunk) mean / p50 / p99.
Outputs are compared token-text by token-text.

  python -m bench.serving_http [--quick] [--num-requests N]  ->  bench/results/serving_http.{json,png}
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from tqdm import tqdm

from bench import common
from bench.workloads import make_trace
from pagedjax import LLM, SamplingParams

NAME = "serving_http"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_ENGINE = dict(num_blocks=128, max_num_seqs=8, max_num_batched_tokens=128)


def _free_port() -> int:
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return port


def in_process(llm: LLM, trace) -> dict:
  start = time.perf_counter()
  ids = [llm.add_request(None, p, SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True,
                                                 logprobs=0))
         for p, o in zip(trace.prompts, trace.output_lens)]
  first, texts = {}, {}
  while llm.has_unfinished_requests():
    for o in llm.step():
      if o.request_id not in first and o.outputs[0].token_ids:
        first[o.request_id] = time.perf_counter() - start
      if o.finished:
        texts[o.request_id] = o.outputs[0].text
  return {"wall_s": time.perf_counter() - start, "ttft_s": [first[i] for i in ids],
          "texts": [texts[i] for i in ids]}


async def _http_trace(url: str, trace) -> dict:
  limits = httpx.Limits(max_connections=len(trace.prompts) + 8)
  async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as h:
    start = time.perf_counter()

    async def one(prompt, out_len):
      first, text, tokens = None, "", 0
      body = {"prompt": prompt, "max_tokens": out_len, "temperature": 0, "ignore_eos": True,
              "logprobs": 0, "stream": True}
      async with h.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
          if not line.startswith("data: ") or line == "data: [DONE]":
            continue
          for c in json.loads(line[6:])["choices"]:
            n = len((c.get("logprobs") or {}).get("tokens") or [])
            if n and first is None:
              first = time.perf_counter() - start
            tokens += n
            text += c["text"]
      return first, text, tokens

    res = await asyncio.gather(*(one(p, o) for p, o in zip(trace.prompts, trace.output_lens)))
    wall = time.perf_counter() - start
  return {"wall_s": wall, "ttft_s": [r[0] for r in res], "texts": [r[1] for r in res],
          "tokens": [r[2] for r in res]}


class _ThreadServer:
  def __init__(self, llm: LLM):
    import uvicorn  # noqa: PLC0415

    from pagedjax.entrypoints.openai.api_server import build_app  # noqa: PLC0415
    from pagedjax.entrypoints.openai.engine import EngineLoop  # noqa: PLC0415

    self.engine = EngineLoop(llm)
    self.port = _free_port()
    self.server = uvicorn.Server(uvicorn.Config(build_app(self.engine, model_name="bench"),
                                                host="127.0.0.1", port=self.port,
                                                log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.02)
    self.url = f"http://127.0.0.1:{self.port}"

  def close(self):
    self.server.should_exit = True
    self.thread.join(10)
    self.engine.shutdown()


class _ProcessServer:
  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("PAGEDJAX_API_KEY", None)
    self.proc = subprocess.Popen(
        [sys.executable, "main.py", "--mode=server", f"--port={self.port}",
         "--config.engine.block_size=16", "--precompile"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 1800  # --precompile: every step program (~10 min here)
    while True:
      if self.proc.poll() is not None:
        raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
      try:
        if httpx.get(self.url + "/health", timeout=2).status_code == 200:
          return
      except httpx.TransportError:
        pass
      if time.time() > deadline:
        raise RuntimeError("the server did not come up in 900 s")
      time.sleep(0.2)

  def close(self):
    self.proc.terminate()
    self.proc.wait(30)


def _summary(name: str, res: dict, out_tokens: int) -> dict:
  t = np.asarray(res["ttft_s"], dtype=float)
  return {"system": name, "wall_s": res["wall_s"], "output_tokens_per_s": out_tokens / res["wall_s"],
          "mean_ttft_s": float(t.mean()), "p50_ttft_s": float(np.median(t)),
          "p99_ttft_s": float(np.percentile(t, 99))}


def _figure(rows: list[dict], ttfts: dict, path) -> None:
  plt = common.pyplot()
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
  names = [r["system"] for r in rows]
  a.bar(names, [r["output_tokens_per_s"] for r in rows], color=["tab:gray", "tab:blue"])
  for i, r in enumerate(rows):
    a.text(i, r["output_tokens_per_s"], f"{r['output_tokens_per_s']:.0f}", ha="center",
           va="bottom", fontsize=8)
  a.set_ylabel("output tokens / s")
  a.set_title("Same trace, in-process engine vs HTTP server")
  for name, color in zip(names, ("tab:gray", "tab:blue")):
    t = np.sort(np.asarray(ttfts[name]))
    b.plot(t, np.arange(1, len(t) + 1) / len(t), color=color, label=name)
  b.set_xlabel("time to first token (s)")
  b.set_ylabel("fraction of requests")
  b.set_title("TTFT distribution")
  b.legend(fontsize=8)
  common.save_figure(fig, path)


def run(quick: bool = False, out_dir=None, *, num_requests: int | None = None,
        seed: int = 0) -> dict:
  n = num_requests or (6 if quick else 64)
  engine_kw = QUICK_ENGINE if quick else {}
  llm = LLM(block_size=16, **engine_kw)
  trace = make_trace("sharegpt-like", n, max_seq_len=llm.max_model_len, seed=seed)
  out_tokens = sum(trace.output_lens)
  bar = tqdm(total=4, desc="serving_http")
  # Warm-up on the same trace compiles the measured run's programs; the prefix cache is
  # reset after it, so that the measured run computes the same prompts the same way.
  in_process(llm, trace)
  llm.reset_prefix_cache()
  bar.update()
  local = in_process(llm, trace)
  bar.update()
  if quick:
    del llm
    server = _ThreadServer(LLM(block_size=16, **engine_kw))
  else:
    server = _ProcessServer()
  try:
    asyncio.run(_http_trace(server.url, trace))  # warm-up, then the same reset
    httpx.post(server.url + "/reset_prefix_cache", timeout=60).raise_for_status()
    bar.update()
    remote = asyncio.run(_http_trace(server.url, trace))
    bar.update()
  finally:
    server.close()
    bar.close()
  identical = remote["texts"] == local["texts"] and remote["tokens"] == list(trace.output_lens)
  rows = [_summary("in-process", local, out_tokens), _summary("http", remote, out_tokens)]
  ratio = rows[1]["output_tokens_per_s"] / rows[0]["output_tokens_per_s"]
  cols = ["system", "wall_s", "output_tokens_per_s", "mean_ttft_s", "p50_ttft_s", "p99_ttft_s"]
  print(common.format_table(cols, [[r[c] for c in cols] for r in rows]))
  print(f"http / in-process throughput: {ratio:.3f}; TTFT mean +"
        f"{(rows[1]['mean_ttft_s'] - rows[0]['mean_ttft_s']) * 1e3:.1f} ms; outputs identical: "
        f"{identical}")
  out = common.results_dir(quick, out_dir)
  _figure(rows, {"in-process": local["ttft_s"], "http": remote["ttft_s"]}, out / f"{NAME}.png")
  report = {
      "benchmark": NAME,
      "command": "python -m bench.serving_http" + (" --quick" if quick else ""),
      "inputs": {"trace": "sharegpt-like", "num_requests": n, "seed": seed,
                 "engine": engine_kw or "LLM() defaults, block_size 16",
                 "server": "thread in this process" if quick else "python main.py --mode=server"},
      "machine": common.machine_info(),
      "headline": {"http / in-process throughput": round(ratio, 3),
                   "http mean TTFT - in-process (ms)": round(
                       (rows[1]["mean_ttft_s"] - rows[0]["mean_ttft_s"]) * 1e3, 1),
                   "outputs identical": identical},
      "results": rows,
      "outputs_identical": identical,
      "figure": f"{NAME}.png",
      "notes": ["Each system served the trace once to warm up; compile time excluded.",
                "Shared 2-core machine: the client and the server share its cores."],
  }
  path = common.write_json(out / f"{NAME}.json", report)
  print(f"wrote {path}")
  return report


def main(argv: list[str] | None = None) -> dict:
  return common.trace_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
  main()

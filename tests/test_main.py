"""main.py as a user runs it: a bad flag or config value is one absl-style error line, no
traceback; an unknown --config field names the valid keys; a good run prints text."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=timeout)


BAD = {  # args: (text the error line must contain)
  ("--config.engine.foo=1",): ("--config.engine.foo", "block_size", "max_num_batched_tokens"),
  ("--config.bogus.x=2",): ("--config.bogus", "engine", "sampling"),
  ("--config.engine.block_size=3",): ("block_size", "power of two", "3"),
  ("--config.engine.attention_impl=cuda",): ("attention_impl", "cuda"),
  ("--config.sampling.temperature=-1",): ("temperature", "-1"),
  ("--config.engine.block_size=abc",): ("block_size", "abc"),
  ("--mode=bogus",): ("mode", "bogus"),
}


@pytest.mark.parametrize("args", list(BAD), ids=[" ".join(a) for a in BAD])
def test_bad_flag_or_config_value_is_one_error_line(args):
  r = _main(*args)
  assert r.returncode == 1, r.stdout + r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  fatal = [line for line in r.stderr.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1, r.stderr
  for text in BAD[args]:
    assert text in fatal[0], fatal[0]


def test_main_job_serves_a_prompt():
  r = _main("--prompt=def ", "--config.sampling.max_tokens=4")
  assert r.returncode == 0, r.stderr
  assert "--- prompt (" in r.stdout and "-> [4 tokens, length]" in r.stdout, r.stdout
  assert "--- memory report" in r.stdout


def test_server_mode_serves_on_the_loopback_and_says_so(tmp_path):
  """`python main.py --mode=server` as the README runs it: binds 127.0.0.1, prints where,
  answers /health and a completion with the API key from the environment."""
  import socket  # noqa: PLC0415
  import time  # noqa: PLC0415

  import httpx  # noqa: PLC0415

  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PAGEDJAX_API_KEY="k")
  log = open(tmp_path / "server.log", "w+")
  proc = subprocess.Popen([sys.executable, "main.py", "--mode=server", f"--port={port}",
                           "--config.engine.num_blocks=32", "--config.engine.max_num_seqs=2",
                           "--config.engine.max_num_batched_tokens=32"],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
      assert proc.poll() is None, open(tmp_path / "server.log").read()
      try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.time() < deadline, "the server did not come up"
      time.sleep(0.2)
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=120,
                   json={"model": "pagedjax-bundled", "prompt": "def ", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
  finally:
    proc.terminate()
    proc.wait(30)
  out = open(tmp_path / "server.log").read()
  assert f"http://127.0.0.1:{port} (the loopback only)" in out and "API key required" in out

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

"""pagedjax main job: serve prompts with the paged engine, or (--mode=train) train the bundled model.

  python main.py                                   # bundled model, default prompts
  python main.py --prompt="def " --config.sampling.max_tokens=64
  python main.py --config.engine.block_size=32 --config.engine.num_blocks=64
  python main.py --mode=train                      # reproduce the bundled weights
  python main.py --mode=server                     # OpenAI-compatible server on 127.0.0.1:8000
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python main.py --config.engine.tensor_parallel_size=4
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pagedjax.entrypoints import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")


def _fatal(message: str) -> None:
  """absl's one-line flag error, then exit 1 (no traceback)."""
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                   "Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(1)


try:
  # config_flags applies --config.* overrides when the flag is defined, i.e. here.
  _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                            "Config file (Python, get_config()).")
except (AttributeError, KeyError) as e:
  message = cli.unknown_config_override(sys.argv[1:])
  _fatal(message or f"bad --config override: {e}")
_MODE = flags.DEFINE_enum("mode", "serve", ["serve", "train", "server"],
                          "Serve prompts, train the bundled model, or run the HTTP server.")
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "Prompt(s) to serve instead of the config's.")
_MODEL = flags.DEFINE_string("model", None, "Model directory (overrides config.model).")
_OUT = flags.DEFINE_string("train_dir", None, "Training output dir (default: pagedjax/weights/assets).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Server: address to bind (the loopback by default).")
_PORT = flags.DEFINE_integer("port", 8000, "Server: TCP port.")
_API_KEY = flags.DEFINE_string("api_key", None, "Server: require 'Authorization: Bearer <key>' on "
                               "/v1 routes (default: $PAGEDJAX_API_KEY, if set).")
_SERVED_NAME = flags.DEFINE_string("served_model_name", None, "Server: the model name clients "
                                   "use (default: the model directory's name, or pagedjax-bundled).")
_MAX_QUEUED = flags.DEFINE_integer("max_queued_requests", 256, "Server: requests that may wait "
                                   "beyond max_num_seqs; more get 503 with Retry-After.")
_PRECOMPILE = flags.DEFINE_bool("precompile", False, "Server: compile every step program before "
                                "serving (no compile stalls later; takes minutes on a CPU).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probing INFO lines
  config = _CONFIG.value
  if _MODEL.value is not None:
    config.model = _MODEL.value
  try:
    cli.init_distributed(config)
    if _MODE.value == "train":
      cli.train(config, out_dir=_OUT.value)
    elif _MODE.value == "server":
      cli.server(config, host=_HOST.value, port=_PORT.value,
                 api_key=_API_KEY.value or os.environ.get("PAGEDJAX_API_KEY") or None,
                 served_model_name=_SERVED_NAME.value, max_queued_requests=_MAX_QUEUED.value,
                 precompile=_PRECOMPILE.value)
    else:
      cli.serve(config, prompts=_PROMPTS.value)
  except cli.ConfigError as e:
    _fatal(str(e))


if __name__ == "__main__":
  app.run(main)

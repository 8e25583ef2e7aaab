"""pagedjax main job: serve prompts with the paged engine, or (--mode=train) train the bundled model.

  python main.py                                   # bundled model, default prompts
  python main.py --prompt="def " --config.sampling.max_tokens=64
  python main.py --config.engine.block_size=32 --config.engine.num_blocks=64
  python main.py --mode=train                      # reproduce the bundled weights
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
_MODE = flags.DEFINE_enum("mode", "serve", ["serve", "train"], "Serve prompts or train the bundled model.")
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "Prompt(s) to serve instead of the config's.")
_MODEL = flags.DEFINE_string("model", None, "Model directory (overrides config.model).")
_OUT = flags.DEFINE_string("train_dir", None, "Training output dir (default: pagedjax/weights/assets).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probing INFO lines
  config = _CONFIG.value
  if _MODEL.value is not None:
    config.model = _MODEL.value
  try:
    if _MODE.value == "train":
      cli.train(config, out_dir=_OUT.value)
    else:
      cli.serve(config, prompts=_PROMPTS.value)
  except cli.ConfigError as e:
    _fatal(str(e))


if __name__ == "__main__":
  app.run(main)

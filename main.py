"""pagedjax main job: serve prompts with the paged engine, or (--mode=train) train the bundled model.

  python main.py                                   # bundled model, default prompts
  python main.py --prompt="def " --config.sampling.max_tokens=64
  python main.py --config.engine.block_size=32 --config.engine.num_blocks=64
  python main.py --mode=train                      # reproduce the bundled weights
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from pagedjax.entrypoints import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Config file (Python, get_config()).")
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
  if _MODE.value == "train":
    cli.train(config, out_dir=_OUT.value)
  else:
    cli.serve(config, prompts=_PROMPTS.value)


if __name__ == "__main__":
  app.run(main)

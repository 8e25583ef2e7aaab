"""Entry points: the vLLM-shaped `LLM` engine API and what `main.py` runs."""

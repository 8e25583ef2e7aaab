"""An OpenAI-compatible HTTP server over the engine (`python main.py --mode=server`).

  protocol   pydantic request models and the OpenAI error object
  engine     EngineLoop: the one background thread that owns the `LLM` and steps it
  metrics    Prometheus metrics with vLLM's names under the `pagedjax:` prefix
  api_server the FastAPI app (completions, chat, models, health, metrics, the pool page)
"""

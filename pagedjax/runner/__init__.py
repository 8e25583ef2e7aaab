"""Device side: the KV-pages pytree, attention dispatch, the model, the sampler, the jitted step.

Nothing here imports the host side (pagedjax.core); it executes plans built from the
scheduler's decisions.
"""

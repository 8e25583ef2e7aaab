"""Host side: block allocation, block tables, sequences, scheduling, beam-search rules.

Plain Python and numpy only; nothing here imports JAX or touches device memory. The
scheduler is the one writer of block state; the runner executes what it decides.
"""

"""Weights and tokenizers: the bundled model, the project's checkpoint format, Hugging Face
directories, and the training loop that produced the bundled weights. No network, no pickle.
"""

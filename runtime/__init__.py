"""Torch-free inference: audio in, embeddings and class scores out."""

"""Serving: a paged latent cache, continuous batching over it, and an OpenAI-compatible HTTP server."""

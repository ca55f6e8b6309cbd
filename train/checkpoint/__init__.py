"""Checkpoints: tags and manifests (the leaf), the crash-safe checkpointer and resume, universal conversion."""

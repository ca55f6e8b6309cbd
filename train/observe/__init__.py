"""Observability: per-step metrics (metrics.jsonl, W&B), evaluation and samples, schedule timelines, MFU."""

"""Observability: per-step metrics (metrics.jsonl, W&B), the run record, memory probes, the divergence policy,
evaluation and samples, schedule timelines, MFU."""

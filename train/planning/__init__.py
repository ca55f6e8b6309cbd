"""Planning: the memory model behind `python -m train.plan` (stage bounds and bytes per stage)."""

"""The `python -m train.X` commands and the run's composition (build.py), with their parts by concern in the
sub-packages config, data, checkpoint, observe, distributed and planning."""

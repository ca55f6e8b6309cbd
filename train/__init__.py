"""The `python -m train.X` commands and the run's composition (build.py), with their parts by concern in the
sub-packages config, data, checkpoint, observe, distributed and planning."""

from train.observe.quiet import quiet_known_library_noise

quiet_known_library_noise()  # before any command imports DeepSpeed, transformers, peft or bitsandbytes

"""Preference training (DPO and its variants, docs/preference.md): the reference log-probabilities computed once
before step 1 through the pipeline's own stages and kept with the run (reference.py), and the run's side of it
(run.py): the loss the last stage computes, the reference read back on resume, TRL's metrics gathered."""

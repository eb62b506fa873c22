"""Batches -> checkpoints: teachers, the distilled student, evaluation and the report.

``flora train`` (train.py: the run, one loop for every objective in loop.py and objectives.py,
distill.py and teachers.py for distillation), ``flora evaluate`` (evaluate.py), ``flora soft-labels``
(soft_labels.py), ``flora report`` (report.py). Imports nothing: torch is loaded by the module used.
"""

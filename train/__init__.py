"""The lean trainer: the run-folder protocol, pretraining, fine-tuning, 3D-to-2D distillation, the
verdict, export and sweeps. It reads the caches and datasets; it never runs a 2D teacher."""

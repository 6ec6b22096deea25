"""Offline work (the ``train`` extra): data, training features, baselines, fitting, evaluation and reports."""

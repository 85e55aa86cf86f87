"""Using a trained model: ``fedpd predict`` (the PD probability of one scan, with an optional Grad-CAM figure).

Imports the foundation modules, ``common.learning``, ``common.cohort`` and ``common.runs``."""

"""Using a trained model: ``fedpd predict`` (the PD probability of one scan, with an optional Grad-CAM figure).

Imports the foundation modules, ``common.learning``, ``common.cohort``, ``common.runs`` and
``common.preprocessing`` (a raw scan is prepared as the run's scans were; SimpleITK is imported only then)."""

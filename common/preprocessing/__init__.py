"""Site-local preprocessing of raw scanner-space T1 scans: N4, affine registration to MNI152, brain mask and
QC (pipeline), on SimpleITK (registration).

Imports the foundation modules, ``common.learning`` and ``common.cohort``."""

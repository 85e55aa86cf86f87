"""Site-local preprocessing of raw scanner-space T1 scans: N4, affine registration to MNI152, brain mask and
QC (pipeline), on SimpleITK (registration).

Imports the foundation modules, ``common.learning`` and ``common.cohort``."""

# the QC outputs beside the registered scans; also read by a site's ClientApp for its QC counts (this module
# imports nothing, so reading the names costs no SimpleITK import)
QC_CSV = "qc.csv"
QC_HTML = "qc.html"

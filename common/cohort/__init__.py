"""The cohort: the manifest contract (manifest), IDA and BIDS ingest (ingest, bids), subject-level splits and
site partitions (splits), and the per-scan readability check (scans).

Imports the foundation modules and ``common.learning`` (the scan check reads scans as training does)."""

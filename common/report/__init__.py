"""The run report: ``report.html`` and ``figures/`` rendered from a run folder's ``report.json``.

Imports the foundation modules, ``common.learning`` and ``common.runs``."""

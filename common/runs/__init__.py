"""A run on disk: the run folder and round selection (rundir), the typed ``rounds.jsonl``/``report.json``
records (records), the checks before a run starts (preflight), the server side of a round (rounds) and the
end of a run (finalize: selected model, threshold, test figures).

Imports the foundation modules, ``common.learning`` and ``common.cohort``."""

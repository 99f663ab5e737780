"""What a run leaves for whoever reproduces or reports it: the run record and the provenance
of an evaluation. The bottom layer: imports nothing from vmatdose."""

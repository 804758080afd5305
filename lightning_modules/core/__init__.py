"""The small core every other package builds on: errors, Hydra glue, output files, the
task (single/multi-label), the threat model (norm, eps), tensor layout. Imports nothing else
of this project."""

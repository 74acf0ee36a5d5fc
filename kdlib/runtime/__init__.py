"""Process and file plumbing every stage needs, whatever it computes.

Here: atomic file writes (io), output folders, their owners and locks, and resolved configs beside them
(outputs), folder digests (digests), the process group (process_group), model folders on disk: offline
loading (models) and fingerprints (fingerprints), the entry-point shape of a stage (cli), JSON-lines metrics
files (metrics), size and speed measurement (speed), PNG plots (plots).
Not here: anything that knows about distillation (losses, students, teachers, the training loop): a module
in runtime/ imports nothing from kdlib but errors, the config loader and other runtime modules.
"""

"""Model archives and files between workers and the orchestrator: archive, upload, and
download with safe extraction into a cache."""

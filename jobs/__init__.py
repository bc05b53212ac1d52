"""Ray job entrypoints (`ray job submit -- python -m jobs.NAME ...`)."""

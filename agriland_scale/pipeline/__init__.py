"""The pipeline: stages, output folder, preflight checks, resumable products and the runner."""

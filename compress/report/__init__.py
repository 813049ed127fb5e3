"""manifest.json -> report.md and plots."""

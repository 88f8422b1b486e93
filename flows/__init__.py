"""Prefect flows: orchestration only (round, campaign, nightly). See DESIGN.md §2."""

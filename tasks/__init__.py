"""Pipeline stages: one module per stage, each a plain function plus a CLI entry (tasks.cli)."""

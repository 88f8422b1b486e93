"""Rollout and teacher-scoring engines (HF and vLLM) behind two small Protocols."""

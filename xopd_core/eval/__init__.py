"""Evaluation: answer extraction, accuracy per task and modality, the paper's Avg-Drop."""

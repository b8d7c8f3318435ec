"""DPG-Bench and DSG-1k: generation, VQA backends, scoring, reports."""

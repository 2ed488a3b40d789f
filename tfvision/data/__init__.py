"""Data: sources -> splits -> check -> pipeline (decode, augment, mix)."""

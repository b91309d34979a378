"""Data path: records -> canonical examples -> token ids -> padded batches."""

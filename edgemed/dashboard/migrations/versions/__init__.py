"""The revisions, oldest first: 0001 (before receipts), 0002 (receipts), 0003 (fleet scale)."""

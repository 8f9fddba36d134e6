"""Alembic migrations of the dashboard database (run by ``schema.migrate`` when a store opens; no alembic.ini)."""

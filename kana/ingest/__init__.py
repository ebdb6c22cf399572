"""Ingestion pipeline: receive (receiver, schemas) → partition (spool) → drain → apply (processor)."""

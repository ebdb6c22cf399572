"""Bulk imports: CSV files and billing-provider customers."""

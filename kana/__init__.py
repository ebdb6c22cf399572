"""Kana's Segment destination: domain code. Importing it has no side effects."""

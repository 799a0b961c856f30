"""Parallel layouts: process groups (topology) and vocabulary partition math."""

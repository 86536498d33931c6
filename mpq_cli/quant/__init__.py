"""Quantization primitives: pure tensor functions shared by every method."""

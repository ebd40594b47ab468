"""Smaller models for the edge: gradual magnitude pruning (`prune`) and int8 with qwix (`quantize`)."""

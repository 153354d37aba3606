"""Stackers and blenders over out-of-fold probability matrices."""

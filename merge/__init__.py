"""Merging: mergekit recipes over stage names, pre/post-merge checks, running mergekit, the SLERP t search."""

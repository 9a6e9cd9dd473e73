"""The hook patch sets for Megatron-LM (package data, one folder per pinned tag)."""

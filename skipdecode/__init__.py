"""SkipDecode for OPT: export (torch side) and runtime (no torch)."""

"""Stream tools: load, verify, convert, extract and analyze saved migration streams."""

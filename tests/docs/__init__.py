"""Pages generated from the code stay as the code is (docs/settings-reference.md)."""

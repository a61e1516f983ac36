"""The distributions as a user gets them: metadata, version ranges, licence, and the wheels of
scripts/wheels installed into a new venv (README.md, "Install")."""

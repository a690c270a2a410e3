"""The trainer of the frame selector; run from the repository root: `python -m train`."""

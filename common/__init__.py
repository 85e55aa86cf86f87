"""fedpd common package."""

"""fedpd simulation package."""

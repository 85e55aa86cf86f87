"""fedpd client package."""

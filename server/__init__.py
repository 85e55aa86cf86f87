"""fedpd server package."""

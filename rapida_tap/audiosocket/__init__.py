"""audiosocket."""

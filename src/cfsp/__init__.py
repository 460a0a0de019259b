"""cfsp."""
